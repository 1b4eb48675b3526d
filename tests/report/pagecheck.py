"""Reading a report page back: what a test needs to know about its HTML (links, images,
sections, metric cells), with the standard library's parser, so a malformed page shows up as
missing elements rather than passing by accident."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import unquote, urlparse

import pandas as pd

from pipeline.report import format_metric
from pipeline.report.formatting import format_score

#: Summary metrics the page shows when the summary has them.
METRICS = ("auroc", "auprc", "f1_max", "pixel_auroc", "aupro", "pixel_aupr", "pixel_f1_max",
           "realized_false_alarm_rate", "recall_at_decision")
#: Those shown only where some summary row of the dataset has a value.
OPTIONAL = {"pixel_auroc", "aupro", "pixel_aupr", "pixel_f1_max", "realized_false_alarm_rate",
            "recall_at_decision"}
#: The metrics the overview shows (the comparison's), the optional ones where it has values.
COMPARED = ("auroc", "auprc", "pixel_auroc", "aupro", "realized_false_alarm_rate",
            "recall_at_decision")


@dataclass
class Cell:
    """A table cell with ``data-*`` attributes, and its text."""

    attrs: dict
    text: str = ""


@dataclass
class Page:
    """What :class:`_Reader` found in one page."""

    links: list[tuple[str, str, str]] = field(default_factory=list)  # (tag, attribute, value)
    images: list[str] = field(default_factory=list)
    sections: list[dict] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)
    body: dict = field(default_factory=dict)
    #: dataset section → the image ids of its gallery, in page order
    gallery: dict[str, list[str]] = field(default_factory=dict)
    #: dataset section → its metric, quantile and chart counts
    charts: dict[str, int] = field(default_factory=dict)

    def cells_of(self, cls: str, section: str | None = None) -> list[Cell]:
        """The data cells of CSS class ``cls`` (of one dataset section, or anywhere)."""
        return [c for c in self.cells if c.attrs.get("class") == cls
                and (section is None or c.attrs.get("section") == section)]

    def decision_cells(self) -> dict[tuple, str]:
        """``(dataset, scorer, category, k, column)`` → text of every decisions-table cell."""
        out = {}
        for cell in self.cells:
            a = cell.attrs
            if a.get("class") == "decision":
                key = (a.get("data-dataset"), a.get("data-scorer"), a.get("data-category"),
                       a.get("data-k"), a.get("data-column"))
                assert key not in out, f"decision cell {key} appears twice"
                out[key] = cell.text
        return out

    def metric_cells(self, level: str) -> dict[tuple, str]:
        """``(dataset, scorer, category, k, metric)`` → text of every metric cell of
        ``level`` (``dataset_mean``, ``category``, ``comparison``, ...)."""
        out = {}
        for cell in self.cells:
            a = cell.attrs
            if a.get("class") == "metric" and a.get("data-level") == level:
                key = (a.get("data-dataset"), a.get("data-scorer"), a.get("data-category"),
                       a.get("data-k"), a.get("data-metric"))
                assert key not in out, f"metric cell {key} appears twice"
                out[key] = cell.text
        return out


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._cell: Cell | None = None
        self._section: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.page.tags.add(tag)
        for name in ("src", "href", "xlink:href", "srcset", "poster", "data"):
            if name in a and a[name] is not None:
                self.page.links.append((tag, name, a[name]))
        if tag == "img":
            self.page.images.append(a.get("src") or "")
        if tag == "section":
            self.page.sections.append(a)
            self._section = a.get("data-dataset") if a.get("class") == "dataset" else None
        if self._section is not None:
            if tag == "div" and a.get("class") == "query-row":
                self.page.gallery.setdefault(self._section, []).append(a.get("data-image-id"))
            if tag == "svg":
                self.page.charts[self._section] = self.page.charts.get(self._section, 0) + 1
        if tag == "body":
            self.page.body = a
        if tag == "td" and any(k.startswith("data-") for k in a):
            self._cell = Cell({**a, "section": self._section})
            self.page.cells.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.text += data


def read_page(text: str) -> Page:
    """Parse a report page (or a browser's dump of its DOM)."""
    reader = _Reader()
    reader.feed(text)
    reader.close()
    return reader.page


def local_target(folder: str, link: str) -> str:
    """The file a relative link of a page in ``folder`` points to; fails for anything that
    leaves the folder or is not a plain relative path."""
    parsed = urlparse(link)
    assert not parsed.scheme and not parsed.netloc, f"not a relative link: {link!r}"
    assert not link.startswith("/"), f"absolute path: {link!r}"
    target = os.path.realpath(os.path.join(folder, unquote(parsed.path)))
    root = os.path.realpath(folder)
    assert target.startswith(root + os.sep), f"{link!r} leaves the report folder"
    return target


def expected_metrics(summary: pd.DataFrame, level: str, labelled: set[str]
                     ) -> dict[tuple, str]:
    """What the page must show for ``level`` rows of labelled datasets: format_metric of the
    summary's mean and std, keyed like :meth:`Page.metric_cells`. A pixel metric is shown for
    a dataset when any of its summary rows has a value (pooled rows have none: n/a)."""
    out = {}
    for dataset, everything in summary[summary["dataset"].isin(labelled)].groupby("dataset"):
        shown = [m for m in METRICS if f"{m}_mean" in everything.columns
                 and (m not in OPTIONAL or everything[f"{m}_mean"].notna().any())]
        for r in everything[everything["level"] == level].to_dict("records"):
            for m in shown:
                key = (r["dataset"], r["scorer"], r["category"], str(r["k"]), m)
                out[key] = format_metric(r[f"{m}_mean"], r[f"{m}_std"])
    return out


def expected_comparison(comparison: pd.DataFrame, scorers: list[str]) -> dict[tuple, str]:
    """What the overview must show: every scorer's AUROC and AUPRC of the comparison, and
    its pixel AUROC, AUPRO and decision rates where the comparison has values of them."""
    out = {}
    for s in scorers:
        shown = ["auroc", "auprc"] + [m for m in COMPARED if m in OPTIONAL
                                      and f"{s}_{m}_mean" in comparison.columns
                                      and comparison[f"{s}_{m}_mean"].notna().any()]
        for r in comparison.to_dict("records"):
            for m in shown:
                out[(r["dataset"], s, None, str(r["k"]), m)] = format_metric(
                    r[f"{s}_{m}_mean"], r[f"{s}_{m}_std"])
    return out


def expected_decisions(summary: pd.DataFrame) -> dict[tuple, str]:
    """What the decisions tables must show: per category row of the summary, its
    calibration size, thresholds (mean ± std over seeds, as scores are written), confusion
    counts, undecided rows and anomaly rate, keyed like :meth:`Page.decision_cells`."""
    out = {}
    for r in summary[summary["level"] == "category"].to_dict("records"):
        key = (r["dataset"], r["scorer"], r["category"], str(r["k"]))
        for column in ("calibration_size", "decision_tp", "decision_fp", "decision_tn",
                       "decision_fn", "undecided_count"):
            value = r[column]
            out[(*key, column)] = "n/a" if pd.isna(value) else str(int(value))
        for column in ("decision_threshold", "pixel_decision_threshold"):
            mean, std = r[f"{column}_mean"], r[f"{column}_std"]
            out[(*key, column)] = ("n/a" if pd.isna(mean) else format_score(mean) if pd.isna(std)
                                   else f"{format_score(mean)} ± {format_score(std)}")
        out[(*key, "anomaly_rate")] = format_metric(r["anomaly_rate_mean"], r["anomaly_rate_std"])
    return out
