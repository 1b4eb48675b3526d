"""The report's sections as HTML fragments, from a :class:`~pipeline.report.inputs.RunInputs`.

Pure functions of the inputs (and of the thumbnails already copied): no file is read or
written here. Every text that comes from data goes through :func:`html.escape`; element ids
are generated (``dataset-1``), never taken from data. Metric cells carry ``data-*``
attributes naming what they show, so tests (and people with devtools) can match each number
with its summary row.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.core.metrics import NO_QUERIES, POOLED_CATEGORY
from pipeline.nightly.drift import DRIFT
from pipeline.report import curves, svg
from pipeline.report.formatting import (ANOMALOUS, MISSING, NORMAL, UNLABELLED, format_metric,
                                        format_percent, format_score, format_value, label_name)
from pipeline.report.inputs import RunInputs
from pipeline.report.thumbnails import Thumbnail

#: Summary metrics the tables show, in order: (column prefix, heading, always shown). The
#: optional ones (pixel-level, from scorers with anomaly maps) appear when the summary has
#: them for the dataset.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("auroc", "Image AUROC", True),
    ("auprc", "Image AUPRC", True),
    ("f1_max", "F1-max", True),
    ("pixel_auroc", "Pixel AUROC", False),
    ("aupro", "AUPRO", False),
    ("pixel_aupr", "Pixel AUPR", False),
    ("pixel_f1_max", "Pixel F1-max", False),
    ("realized_false_alarm_rate", "False alarms at the decision", False),
    ("recall_at_decision", "Recall at the decision", False),
)
#: The metrics the overview compares across scorers (the comparison file's).
COMPARED = ("auroc", "auprc", "pixel_auroc", "aupro", "realized_false_alarm_rate",
            "recall_at_decision")
#: The decisions table's columns of the summary's category rows: (column, heading).
DECISION_CELLS: tuple[tuple[str, str], ...] = (
    ("calibration_size", "calibration n"), ("decision_threshold", "score threshold"),
    ("pixel_decision_threshold", "pixel threshold"), ("decision_tp", "TP"),
    ("decision_fp", "FP"), ("decision_tn", "TN"), ("decision_fn", "FN"),
    ("undecided_count", "undecided"), ("anomaly_rate", "anomaly rate"))
LABEL_COLOURS = {NORMAL: "#1f77b4", ANOMALOUS: "#d62728", None: "#7f7f7f"}
REASON_CHARS = 300
#: Level names of the summary's rows.
CATEGORY_LEVEL, MEAN_LEVEL, POOLED_LEVEL = "category", "dataset_mean", "dataset_pooled"


def esc(value: Any) -> str:
    """``value`` as HTML text (``None`` as ``n/a``)."""
    return html.escape(MISSING if value is None else str(value), quote=True)


def _attrs(attrs: Mapping[str, Any]) -> str:
    names = {k: "class" if k == "cls" else k.replace("_", "-") for k in attrs}
    return "".join(f' {names[k]}="{esc(v)}"' for k, v in attrs.items() if v is not None)


def td(text: Any, **attrs: Any) -> str:
    """One table cell of escaped ``text``; ``cls=...`` becomes ``class="..."`` and
    ``data_x=...`` ``data-x="..."``."""
    return f"<td{_attrs(attrs)}>{esc(text)}</td>"


def table(headings: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table of pre-rendered cells (:func:`td`) under escaped headings."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headings)
    body = "".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def note(text: str, cls: str = "note") -> str:
    """A paragraph of escaped ``text``: what a section says when its data is missing."""
    return f'<p class="{cls}">{esc(text)}</p>'


def _is_missing(value: Any) -> bool:
    try:
        return value is None or bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def records(frame: pd.DataFrame) -> list[dict]:
    """``frame.to_dict("records")``, built column by column: each column's ``tolist`` (native
    Python scalars, as ``to_dict`` boxes them), then zipped into rows. ``to_dict`` indexes
    every row's tuple out of the frame's blocks, about 6 ms a call on the report's wide score
    frames, several calls per dataset: most of a report's time per product line (issue 22)."""
    if not len(frame.columns):
        return [{} for _ in range(len(frame))]
    names = list(frame.columns)
    columns = [_native(values) for _, values in frame.items()]
    return [dict(zip(names, row)) for row in zip(*columns)]


def _native(values: pd.Series) -> list:
    """A column's values as ``to_dict`` gives them: an extension column's NA as None."""
    out = values.tolist()
    if isinstance(values.dtype, pd.api.extensions.ExtensionDtype):
        out = [None if v is pd.NA else v for v in out]
    return out


def _plain(value: Any) -> Any:
    """Whole floats as ints (an integer column with nulls reads as float): seed 0, not 0.0."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return value.item() if isinstance(value, np.generic) else value


def floats(frame: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` as a float array, missing values (None, NA, text) as NaN; all NaN when
    the column is absent."""
    if column not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _unique(frame: pd.DataFrame | None, column: str) -> list:
    """The distinct non-missing values of ``column`` (none when it is absent), sorted."""
    if frame is None or column not in frame.columns:
        return []
    values = {_plain(v) for v in frame[column].tolist() if not _is_missing(v)}
    try:
        return sorted(values)
    except TypeError:  # mixed types
        return sorted(values, key=str)


# --------------------------------------------------------------------------------------------
# What the sections are about
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetView:
    """One dataset's rows, and which scorer and seed its single-seed views use."""

    name: str
    scores: pd.DataFrame        # every scorer and seed
    primary: str | None         # the run's first scorer with rows here
    seed: Any                   # the smallest seed (None when seeds are missing)
    scorers: tuple[str, ...]    # scorers with rows here, in run order

    @property
    def labelled(self) -> bool:
        """Whether any query of the dataset has a label: otherwise only label-free parts."""
        return "label" in self.scores.columns and bool(self.scores["label"].notna().any())

    def of(self, scorer: str) -> pd.DataFrame:
        """``scorer``'s rows of the smallest seed: one row per query."""
        rows = self.scores[self.scores["scorer"] == scorer]
        if self.seed is not None and "seed" in rows.columns:
            rows = rows[rows["seed"] == self.seed]
        return rows


def dataset_view(inputs: RunInputs, dataset: str) -> DatasetView:
    """The view of ``dataset`` the per-dataset sections share."""
    rows = inputs.rows_of("scores", dataset)
    present = set(rows["scorer"].astype(str))
    scorers = tuple(s for s in inputs.scorers if s in present) + tuple(
        sorted(present - set(inputs.scorers)))
    seeds = _unique(rows, "seed")
    seed = min(seeds) if seeds else None
    return DatasetView(dataset, rows, scorers[0] if scorers else None, seed, scorers)


@dataclass(frozen=True)
class GalleryItem:
    """One of the most anomalous queries, with its references."""

    image_id: Any
    category: Any
    label: Any
    defect_type: Any
    score: float
    image_uri: str | None
    overlay_uri: str | None
    references: tuple[tuple[Any, str | None], ...]  # (reference id, its image URI or None)
    p_value: Any = None
    flagged: Any = None                 # is_anomalous: True, False or None (no decision)
    mask_uri: str | None = None         # the defect mask of a flagged query
    defect_area: Any = None
    defect_regions: Any = None

    @property
    def outline(self) -> str | None:
        """The mask to outline on the shown image: a flagged query's, on its overlay."""
        return self.mask_uri if self.overlay_uri and self.mask_uri else None

    @property
    def decision(self) -> str:
        """The query's decision in words: ``flagged (p = 0.048)``, ``not flagged (p = …)``
        or ``no decision``."""
        if _is_missing(self.flagged):
            return "no decision"
        words = "flagged" if bool(self.flagged) else "not flagged"
        return f"{words} (p = {format_score(self.p_value)})"

    @property
    def shown_uri(self) -> str | None:
        """The image the gallery shows: the overlay when there is one, else the image."""
        return self.overlay_uri or self.image_uri

    def uris(self) -> list[str]:
        return [u for u in (self.shown_uri, *(uri for _, uri in self.references)) if u]


def _as_list(value: Any) -> list:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return list(value)


def gallery_items(view: DatasetView, top_n: int) -> list[GalleryItem]:
    """The ``top_n`` queries with the highest ``final_score`` of the view's primary scorer
    and seed (scores that are NaN come last)."""
    if view.primary is None or top_n <= 0:
        return []
    rows = view.of(view.primary).sort_values("final_score", ascending=False,
                                            na_position="last", kind="stable").head(top_n)
    items = []
    for row in records(rows):
        ids = _as_list(row.get("reference_ids"))
        uris = _as_list(row.get("reference_uris"))
        refs = tuple((ids[i] if i < len(ids) else None,
                      uris[i] if i < len(uris) and not _is_missing(uris[i]) else None)
                     for i in range(max(len(ids), len(uris))))
        items.append(GalleryItem(
            row.get("image_id"), row.get("category"), row.get("label"), row.get("defect_type"),
            row.get("final_score"), _uri(row.get("image_uri")), _uri(row.get("overlay_uri")),
            refs, p_value=row.get("anomaly_p_value"), flagged=row.get("is_anomalous"),
            mask_uri=_uri(row.get("defect_mask_uri")),
            defect_area=row.get("defect_area_fraction"),
            defect_regions=row.get("defect_regions")))
    return items


def _uri(value: Any) -> str | None:
    return None if _is_missing(value) or not value else str(value)


def shown_images(inputs: RunInputs, top_n: int) -> tuple[list[str], dict[str, str]]:
    """Every image the report shows (to copy before rendering), and shown image URI → the
    defect mask outlined on its thumbnail (flagged queries): one pass over the datasets'
    galleries for both."""
    uris: list[str] = []
    outlines: dict[str, str] = {}
    for dataset in inputs.datasets:
        for item in gallery_items(dataset_view(inputs, dataset), top_n):
            uris.extend(item.uris())
            if item.outline:
                outlines[item.shown_uri] = item.outline
    return uris, outlines


# --------------------------------------------------------------------------------------------
# Header and overview
# --------------------------------------------------------------------------------------------


def header(inputs: RunInputs, generated_at: str) -> str:
    """The run's identity: date, run ids, models, scorers, k, seeds."""
    extra = inputs.summary_extra
    run_ids = sorted(set(_unique(inputs.scores, "run_id")) | set(_unique(inputs.errors, "run_id"))
                     | ({str(extra["run_id"])} if extra.get("run_id") else set()))
    ks = _unique(inputs.scores, "k") or ([extra["k"]] if extra.get("k") is not None else [])
    seeds = _unique(inputs.scores, "seed") or list(extra.get("seeds") or [])
    facts = [("Run date", inputs.run_date), ("Run id(s)", ", ".join(map(str, run_ids)) or MISSING),
             ("Scorers", ", ".join(inputs.scorers) or MISSING),
             ("k (references asked)", ", ".join(map(str, ks)) or MISSING),
             ("Seeds", ", ".join(map(str, seeds)) or MISSING)]
    if extra.get("precision"):
        facts.append(("Precision", extra["precision"]))
    if extra.get("false_alarm_rate") is not None:
        facts.append(("Stated false-alarm rate of the decisions", extra["false_alarm_rate"]))
    if extra.get("failed_rows") is not None:
        facts.append(("Failed rows", _failed_rows(extra)))
    facts.append(("Report generated", generated_at))
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    parts = [f"<header><h1>Anomaly scoring report, {esc(inputs.run_date)}</h1>"
             f'<dl class="facts">{items}</dl>', _models(inputs)]
    if inputs.nightly:
        parts.append(_nightly_facts(inputs.nightly))
    parts.append("</header>")
    return "".join(parts)


def _failed_rows(extra: Mapping[str, Any]) -> str:
    """"F of E (query, seed, scorer) rows (x%)", with the most common reason when any."""
    failed, expected = int(extra["failed_rows"]), int(extra.get("expected_rows") or 0)
    text = f"{failed} of {expected} (query, seed, scorer) rows"
    if expected:
        text += f" ({failed / expected:.1%})"
    if failed and extra.get("failed_reason"):
        text += f"; most often: {extra['failed_reason']}"
    return text


def _models(inputs: RunInputs) -> str:
    """Per scorer: the model id, backbone and weights its rows record."""
    scores = inputs.scores
    if scores.empty:
        models = inputs.summary_extra.get("model_ids") or {}
        return note("Model ids: " + "; ".join(f"{s}: {m}" for s, m in models.items())
                    ) if models else ""
    rows = []
    for scorer in inputs.scorers:
        mine = scores[scores["scorer"] == scorer]
        if mine.empty:
            continue

        def values(column: str) -> str:
            return ", ".join(map(str, _unique(mine, column))) or MISSING

        rows.append([td(scorer), td(values("model_id"), cls="model-id"), td(values("backbone")),
                     td(values("pretrained")), td(values("scoring_mode")), td(values("k_used"))])
    return table(["scorer", "model id", "backbone", "weights", "scoring mode", "k used"], rows,
                 "models")


def _nightly_facts(nightly: Mapping[str, Any]) -> str:
    keys = [("queries_on_date", "queries captured"), ("scored_queries", "scored tonight"),
            ("already_scored", "already scored"), ("carried_rows", "rows carried"),
            ("previous_date", "previous night"), ("alerts", "drift alerts")]
    cells = []
    for key, name in keys:
        if key in nightly:
            value = nightly[key]
            if isinstance(value, list):
                value = ", ".join(map(str, value)) or "none"
            cells.append(f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>")
    return f'<h2 class="small">Nightly run</h2><dl class="facts">{"".join(cells)}</dl>'


def overview(inputs: RunInputs) -> str:
    """Datasets × scorers, image AUROC and AUPRC (the comparison file), and the contents."""
    links = "".join(f'<li><a href="#dataset-{i}">{esc(d)}</a></li>'
                    for i, d in enumerate(inputs.datasets, 1))
    parts = ['<section id="overview"><h2>Overview</h2>']
    comparison = inputs.comparison
    if comparison is None:
        parts.append(note("comparison.parquet is not in this date's outputs: no overview "
                          "table (each dataset's section has its metrics)."))
    elif comparison.empty:
        parts.append(note("The comparison table is empty: no labelled dataset was scored."))
    else:
        pairs = [(s, m, name) for s in inputs.scorers for m, name, always in METRICS
                 if m in COMPARED and f"{s}_{m}_mean" in comparison.columns
                 and (always or comparison[f"{s}_{m}_mean"].notna().any())]
        headings = ["dataset", "k"] + [f"{s} {name}" for s, _, name in pairs]
        rows = []
        for row in records(comparison):
            cells = [td(row.get("dataset")), td(row.get("k"))]
            cells += [td(format_metric(row.get(f"{s}_{m}_mean"), row.get(f"{s}_{m}_std")),
                         cls="metric", data_level="comparison", data_dataset=row.get("dataset"),
                         data_scorer=s, data_k=row.get("k"), data_metric=m)
                      for s, m, _ in pairs]
            rows.append(cells)
        parts.append(table(headings, rows, "comparison"))
        parts.append(note("Mean over each dataset's categories, ± population std over seeds."))
    if links:
        parts.append(f'<nav><h3>Datasets</h3><ul>{links}'
                     '<li><a href="#errors">Errors</a></li></ul></nav>')
    parts.append("</section>")
    return "".join(parts)


def nothing_scored(inputs: RunInputs) -> str:
    """What the page says in place of dataset sections when the date has no scores."""
    return f'<section id="no-scores"><h2>No scores</h2>{note(NO_QUERIES, "warning")}</section>'


# --------------------------------------------------------------------------------------------
# One dataset
# --------------------------------------------------------------------------------------------


def _metric_columns(rows: pd.DataFrame) -> list[tuple[str, str]]:
    return [(m, name) for m, name, always in METRICS
            if f"{m}_mean" in rows.columns and (always or rows[f"{m}_mean"].notna().any())]


def _metric_rows(rows: pd.DataFrame, metrics: list[tuple[str, str]], *, category: bool
                 ) -> list[list[str]]:
    out = []
    for row in records(rows):
        cells = [td(row.get("scorer"))]
        if category:
            cells.append(td(row.get("category")))
        cells += [td(row.get("k")), td(row.get("query_count")), td(row.get("anomalous_count")),
                  td(row.get("normal_count"))]
        cells += [td(format_metric(row.get(f"{m}_mean"), row.get(f"{m}_std")), cls="metric",
                     data_level=row.get("level"), data_dataset=row.get("dataset"),
                     data_scorer=row.get("scorer"), data_category=row.get("category"),
                     data_k=row.get("k"), data_metric=m)
                  for m, _ in metrics]
        out.append(cells)
    return out


def _ordered(rows: pd.DataFrame, scorers: Sequence[str]) -> pd.DataFrame:
    """``rows`` by scorer (in run order), category and k, ties in their order. The order is
    found on those three columns alone and the wide summary rows moved once (sorting the
    rows themselves copied every column three times, per dataset: issue 22)."""
    rank = {s: i for i, s in enumerate(scorers)}
    keys = pd.DataFrame({"_rank": rows["scorer"].map(lambda s: rank.get(s, len(rank))),
                         "category": rows["category"], "k": rows["k"]})
    order = keys.reset_index(drop=True).sort_values(["_rank", "category", "k"],
                                                    kind="stable").index
    return rows.take(order)


def metrics_section(inputs: RunInputs, view: DatasetView) -> str:
    """The dataset's metrics per scorer (summary ``dataset_mean`` rows), with the pooled and
    per-category rows folded away below."""
    parts = ["<h3>Metrics</h3>"]
    if inputs.summary is None:
        return "".join(parts) + note("summary.parquet is not in this date's outputs: no metrics.")
    rows = inputs.rows_of("summary", view.name)
    if rows.empty:
        return "".join(parts) + note("The summary has no rows for this dataset.")
    rows = _ordered(rows, inputs.scorers)
    mean = rows[rows["level"] == MEAN_LEVEL]
    metrics = _metric_columns(rows)
    counts = ["k", "queries", "anomalous", "normal"]
    headings = ["scorer", *counts, *(name for _, name in metrics)]
    parts.append(table(headings, _metric_rows(mean, metrics, category=False), "metrics"))
    n_seeds = _unique(rows, "n_seeds")
    parts.append(note(f"Mean over the dataset's categories of each seed's metric, ± population "
                      f"std over {', '.join(map(str, n_seeds)) or MISSING} seed(s)."))
    detail = rows[rows["level"].isin([POOLED_LEVEL, CATEGORY_LEVEL])]
    if not detail.empty:
        parts.append("<details><summary>Pooled and per-category metrics</summary>")
        parts.append(table(["scorer", "category", *counts, *(name for _, name in metrics)],
                           _metric_rows(detail, metrics, category=True), "metrics detail"))
        parts.append(note(f"{POOLED_CATEGORY}: all the dataset's queries pooled per seed."))
        parts.append("</details>")
    return "".join(parts)


def quantiles_section(inputs: RunInputs, view: DatasetView) -> str:
    """Score quantiles per scorer (unlabelled datasets have no metrics)."""
    parts = ["<h3>Score distribution</h3>"]
    summary = inputs.summary
    rows = None if summary is None else inputs.rows_of("summary", view.name)
    rows = None if rows is None else rows[rows["level"] == POOLED_LEVEL]
    if rows is None or rows.empty:
        return "".join(parts) + note("The summary has no pooled rows for this dataset: no "
                                     "quantiles.")
    body = [[td(r.get("scorer")), td(r.get("k")), td(r.get("query_count"))]
            + [td(format_score(r.get(c)), cls="quantile", data_scorer=r.get("scorer"),
                  data_quantile=c) for c in ("score_p50", "score_p90", "score_p99", "score_max")]
            for r in records(_ordered(rows, inputs.scorers))]
    parts.append(table(["scorer", "k", "queries", "p50", "p90", "p99", "max"], body, "quantiles"))
    parts.append(note("The dataset has no labels: no metrics, curves or per-label histograms. "
                      "Quantiles over every seed's scores."))
    return "".join(parts)


def curves_section(view: DatasetView) -> str:
    """ROC and precision-recall curves, one line per scorer, on the smallest seed."""
    parts = ["<h3>ROC and precision-recall</h3>"]
    roc_lines, pr_lines, n = [], [], 0
    for i, scorer in enumerate(view.scorers):
        rows = view.of(scorer)
        labels, scores = floats(rows, "label"), floats(rows, "final_score")
        roc, pr = curves.roc(labels, scores), curves.precision_recall(labels, scores)
        if roc is None or pr is None:
            continue
        n = max(n, len(curves.labelled_pairs(labels, scores)[0]))
        roc_lines.append(svg.Series(f"{scorer} (AUROC {format_value(roc.area)})",
                                    roc.x.tolist(), roc.y.tolist(), svg.colour(i)))
        pr_lines.append(svg.Series(f"{scorer} (AP {format_value(pr.area)})",
                                   pr.x.tolist(), pr.y.tolist(), svg.colour(i)))
    if not roc_lines:
        return "".join(parts) + note("Curves need normal and anomalous queries; this dataset "
                                     "has one class only.")
    parts.append('<div class="charts">')
    parts.append(svg.line_chart(roc_lines, title=f"ROC, {view.name}", x_label="false-positive rate",
                                y_label="true-positive rate", x_range=(0, 1), y_range=(0, 1.02),
                                diagonal=True))
    parts.append(svg.line_chart(pr_lines, title=f"Precision-recall, {view.name}",
                                x_label="recall", y_label="precision", x_range=(0, 1),
                                y_range=(0, 1.02)))
    parts.append("</div>")
    parts.append(note(f"Seed {view.seed}: the dataset's {n} labelled queries pooled over its "
                      "categories (the summary's pooled figure for that seed)."))
    return "".join(parts)


def histograms_section(view: DatasetView) -> str:
    """Per scorer, the smallest seed's final scores, by label when the dataset has labels."""
    parts = ["<h3>Score histograms</h3>", '<div class="charts">']
    for scorer in view.scorers:
        rows = view.of(scorer)
        scores = floats(rows, "final_score")
        edges = curves.bin_edges(scores)
        groups = []
        labels = floats(rows, "label")
        if view.labelled:
            for value in (NORMAL, ANOMALOUS, None):
                keep = np.isnan(labels) if value is None else labels == value
                if keep.any():
                    groups.append(svg.Bars(f"{label_name(value)} (n={int(keep.sum())})",
                                           curves.shares(scores[keep], edges).tolist(),
                                           LABEL_COLOURS[value]))
        else:
            groups.append(svg.Bars(f"all queries (n={len(scores)})",
                                   curves.shares(scores, edges).tolist(), LABEL_COLOURS[None]))
        parts.append(svg.histogram(groups, edges.tolist(), title=f"{scorer}, {view.name}",
                                   x_label="final score"))
    parts.append("</div>")
    parts.append(note(f"Seed {view.seed}; scorers' scores are on scales of their own."))
    return "".join(parts)


def _picture(thumb: Thumbnail | None, alt: str, cls: str) -> str:
    if thumb is None or thumb.path is None:
        reason = thumb.problem if thumb is not None else "no image recorded"
        return f'<div class="{cls} missing">{esc("image unavailable: " + str(reason))}</div>'
    return (f'<img class="{cls}" src="{esc(thumb.path)}" width="{thumb.width}" '
            f'height="{thumb.height}" alt="{esc(alt)}" loading="eager">')


def gallery_section(view: DatasetView, top_n: int, thumbs: Mapping[str, Thumbnail]) -> str:
    """The most anomalous queries: image (or overlay) beside its references."""
    items = gallery_items(view, top_n)
    parts = [f"<h3>Most anomalous queries ({esc(view.primary)}, seed {esc(view.seed)})</h3>"]
    if not items:
        return "".join(parts) + note("No scored query to show.")
    has_refs = any(uri for item in items for _, uri in item.references)
    parts.append('<div class="gallery">')
    for rank, item in enumerate(items, 1):
        caption = (f"#{rank} score {format_score(item.score)} · {label_name(item.label)}"
                   f" · {item.category if not _is_missing(item.category) else MISSING}")
        if not _is_missing(item.defect_type):
            caption += f" · {item.defect_type}"
        caption += f" · {item.decision}"
        if item.outline:
            caption += (f" · outlined defect: {format_percent(item.defect_area)} of the image, "
                        f"{_plain(item.defect_regions)} region(s)")
        kind = "overlay" if item.overlay_uri else "image"
        picture = _picture(thumbs.get(item.shown_uri) if item.shown_uri else None,
                           f"{kind} of query {item.image_id}", "query")
        refs = "".join(
            f'<figure class="reference">{_picture(thumbs.get(uri) if uri else None, f"reference {rid}", "reference")}'
            f"<figcaption>{esc(rid)}</figcaption></figure>"
            for rid, uri in item.references if uri)
        if not refs:
            ids = ", ".join(str(rid) for rid, _ in item.references if rid is not None)
            refs = note(("reference images not recorded; ids: " + ids) if ids
                        else "no references recorded")
        parts.append(
            f'<div class="query-row" data-image-id="{esc(item.image_id)}">'
            f'<figure class="query">{picture}<figcaption>{esc(caption)}<br>'
            f'<span class="id">{esc(item.image_id)} ({esc(kind)})</span></figcaption></figure>'
            f'<div class="references">{refs}</div></div>')
    parts.append("</div>")
    if any(item.overlay_uri for item in items):
        parts.append(note("Overlays blend the anomaly map into the image, normalised per "
                          "image: they show where, the score says how much."))
    if any(item.outline for item in items):
        parts.append(note("A white outline marks a flagged query's defect mask: the pixels "
                          "above its group's pixel threshold, calibrated on normal images."))
    if not has_refs:
        parts.append(note("The scores table has no reference_uris column (or no value in it): "
                          "reference thumbnails are left out."))
    return "".join(parts)


def _decision_cell(row: Mapping[str, Any], column: str) -> str:
    """One decisions-table cell: thresholds and the anomaly rate as mean ± std over seeds,
    counts as they are."""
    if column in ("decision_threshold", "pixel_decision_threshold"):
        mean, std = row.get(f"{column}_mean"), row.get(f"{column}_std")
        text = MISSING if _is_missing(mean) else (
            format_score(mean) if _is_missing(std) else
            f"{format_score(mean)} ± {format_score(std)}")
    elif column == "anomaly_rate":
        text = format_metric(row.get("anomaly_rate_mean"), row.get("anomaly_rate_std"))
    else:
        value = row.get(column)
        text = MISSING if _is_missing(value) else str(_plain(value))
    return td(text, cls="decision", data_dataset=row.get("dataset"),
              data_scorer=row.get("scorer"), data_category=row.get("category"),
              data_k=row.get("k"), data_column=column)


def decisions_section(inputs: RunInputs, view: DatasetView) -> str:
    """Per scorer and category: the calibrated decision's threshold, calibration size,
    confusion counts (summed over seeds) and anomaly rate, and why a group has none."""
    parts = ["<h3>Decisions</h3>"]
    summary = inputs.summary
    if summary is None or "calibration_size" not in summary.columns:
        return "".join(parts) + note("The summary has no decisions (written before them).")
    rows = inputs.rows_of("summary", view.name)
    rows = rows[rows["level"] == CATEGORY_LEVEL]
    if rows.empty:
        return "".join(parts) + note("The summary has no category rows for this dataset.")
    rows = _ordered(rows, inputs.scorers)
    body = [[td(r.get("scorer")), td(r.get("category")), td(r.get("k"))]
            + [_decision_cell(r, c) for c, _ in DECISION_CELLS]
            for r in records(rows)]
    parts.append(table(["scorer", "category", "k", *(h for _, h in DECISION_CELLS)], body,
                       "decisions"))
    alpha = _unique(rows, "false_alarm_rate")
    n_seeds = _unique(rows, "n_seeds")
    parts.append(note(
        f"A query is flagged when its conformal p-value against its group's normal "
        f"calibration images is at most the stated false-alarm rate "
        f"{', '.join(map(str, alpha)) or MISSING} (equivalently, its score is strictly above "
        f"the score threshold); that rate holds marginally for normal queries exchangeable "
        f"with the calibration images. Thresholds: mean ± std over "
        f"{', '.join(map(str, n_seeds)) or MISSING} seed(s); counts summed over seeds."))
    notes = [f"{r.get('scorer')} / {r.get('category')}: {r.get('decision_note')}"
             for r in records(rows) if not _is_missing(r.get("decision_note"))]
    if notes:
        parts.append('<ul class="decision-notes">' + "".join(
            f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    return "".join(parts)


def dataset_section(inputs: RunInputs, view: DatasetView, index: int, top_n: int,
                    thumbs: Mapping[str, Thumbnail], history: str) -> str:
    """Everything the report shows about one dataset."""
    parts = [f'<section class="dataset" id="dataset-{index}" data-dataset="{esc(view.name)}">',
             f"<h2>{esc(view.name)}</h2>"]
    errors = 0
    if inputs.errors is not None and "dataset" in inputs.errors.columns:
        errors = len(inputs.rows_of("errors", view.name))
    if view.primary is None:
        parts.append(note(f"No query of this dataset was scored ({errors} error rows, see "
                          "Errors).", "warning"))
    else:
        rows = view.of(view.primary)
        labels = floats(rows, "label")
        parts.append(note(
            f"{len(rows)} queries scored by {len(view.scorers)} scorer(s): "
            f"{int((labels == ANOMALOUS).sum())} anomalous, {int((labels == NORMAL).sum())} "
            f"normal, {int(np.isnan(labels).sum())} {UNLABELLED}; {errors} error rows."))
        if view.labelled:
            parts.append(metrics_section(inputs, view))
            parts.append(curves_section(view))
        else:
            parts.append(quantiles_section(inputs, view))
        parts.append(decisions_section(inputs, view))
        parts.append(histograms_section(view))
        parts.append(gallery_section(view, top_n, thumbs))
    parts.append(history)
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def errors_section(inputs: RunInputs) -> str:
    """Error rows per stage, with how many, which datasets, and the most frequent reason."""
    parts = ['<section id="errors"><h2>Errors</h2>']
    errors = inputs.errors
    if errors is None:
        parts.append(note("No errors table is in force for this date."))
    elif errors.empty:
        parts.append(note("No error rows: every query was scored."))
    else:
        frame = errors.assign(stage=errors["stage"].fillna(MISSING).astype(str),
                              reason=errors["reason"].fillna("").astype(str))
        rows = []
        for stage, group in sorted(frame.groupby("stage"), key=lambda g: (-len(g[1]), g[0])):
            reason = group["reason"].value_counts().index[0]
            if len(reason) > REASON_CHARS:
                reason = reason[:REASON_CHARS] + "…"
            datasets = ", ".join(str(d) if not _is_missing(d) else "(none)"
                                 for d in sorted(group["dataset"].unique(), key=str))
            rows.append([td(stage), td(len(group), cls="count", data_stage=stage), td(datasets),
                         td(reason, cls="reason")])
        parts.append(table(["stage", "rows", "datasets", "example reason"], rows, "errors"))
        parts.append(note("Query failures repeat once per seed; reference and manifest failures "
                          "appear once."))
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Nightly history and drift
# --------------------------------------------------------------------------------------------


def is_nightly(inputs: RunInputs) -> bool:
    """Whether the date comes from nightly runs: drift or ``nightly.json`` files, or earlier
    dates with summaries."""
    return inputs.drift is not None or inputs.nightly is not None or len(inputs.history) > 1


def _history_scorer(inputs: RunInputs) -> str | None:
    """The scorer the drift follows (the nightly run's first), else the run's first."""
    scorer = inputs.drift_extra.get("scorer")
    return str(scorer) if scorer else (inputs.scorers[0] if inputs.scorers else None)


def drift_section(inputs: RunInputs) -> str:
    """Tonight's drift report: per dataset, its status against the previous night."""
    parts = ['<section id="drift"><h2>Drift against the previous night</h2>']
    drift = inputs.drift
    if drift is None:
        parts.append(note("No drift file for this date (the first night, or not a nightly "
                          "run)."))
    elif drift.empty:
        parts.append(note("The drift report has no rows."))
    else:
        extra = inputs.drift_extra
        rows = []
        for r in records(drift):
            status = str(r.get("status", MISSING))
            rows.append([td(r.get("dataset")),
                         td(status, cls=f"status {status}", data_dataset=r.get("dataset"))]
                        + [td(format_percent(_alert_rate(r, n))) for n in ("today", "previous")]
                        + [td(format_score(r.get(f"{n}_{q}"))) for n in ("today", "previous")
                           for q in ("p50", "p90", "p99")])
        decided = "today_anomaly_rate" in drift.columns
        parts.append(table(["dataset", "status", "anomaly rate" if decided else "above",
                            "prev anomaly rate" if decided else "prev above", "p50", "p90",
                            "p99", "prev p50", "prev p90", "prev p99"], rows, "drift"))
        if decided:
            what = (f"the anomaly rate is the share of decided queries flagged at false-alarm "
                    f"rate {format_score(extra.get('false_alarm_rate'))}")
        else:
            threshold = drift["threshold"].iloc[0] if "threshold" in drift.columns else None
            what = f"'above' is the share of scores at or above {format_score(threshold)}"
        parts.append(note(
            f"Scorer {extra.get('scorer', MISSING)}; previous night "
            f"{extra.get('previous_date') or 'none'}; {what}; tolerance "
            f"{format_score(extra.get('tolerance'))}."))
    parts.append("</section>")
    return "".join(parts)


def _alert_rate(row: Mapping[str, Any], night: str) -> Any:
    """A drift row's anomaly rate of ``night`` (today / previous); drift files written
    before decisions have the share of scores above a fixed threshold instead."""
    if f"{night}_anomaly_rate" in row:
        return row.get(f"{night}_anomaly_rate")
    return row.get(f"{night}_above_fraction")


QUANTILES = ("score_p50", "score_p90", "score_p99")


@dataclass(frozen=True)
class History:
    """One dataset's nights: per night its pooled score quantiles (the summary's), its
    anomaly rate (the drift file's: the share of decided queries flagged; for drift files
    written before decisions, the share of scores at or above the alert threshold) and
    whether it alerted."""

    dates: tuple[str, ...]
    scorer: str | None
    quantiles: Mapping[str, tuple[float, ...]]  # QUANTILES → one value per night (NaN: none)
    rate: tuple[float, ...]
    alerts: tuple[int, ...]                     # indexes into ``dates``

    @property
    def empty(self) -> bool:
        values = [v for q in self.quantiles.values() for v in q] + list(self.rate)
        return all(math.isnan(v) for v in values)


def _first(frame: pd.DataFrame | None, column: str) -> float:
    if frame is None or frame.empty or column not in frame.columns:
        return math.nan
    value = frame[column].iloc[0]
    return math.nan if _is_missing(value) else float(value)


def history_series(inputs: RunInputs, dataset: str) -> History:
    """The numbers the history plots of ``dataset`` show, over ``inputs.history``."""
    scorer = _history_scorer(inputs)
    quantiles: dict[str, list[float]] = {q: [] for q in QUANTILES}
    rate, alerts = [], []
    for x, night in enumerate(inputs.history):
        summary = night.rows_of("summary", dataset)
        pooled = None if summary is None else summary[(summary["level"] == POOLED_LEVEL)
                                                      & (summary["scorer"] == scorer)]
        if pooled is not None and "k" in pooled.columns:
            pooled = pooled.sort_values("k", kind="stable")  # several k: the smallest
        for q in QUANTILES:
            quantiles[q].append(_first(pooled, q))
        drift = night.rows_of("drift", dataset)
        rate.append(_first(drift, "today_anomaly_rate" if drift is not None
                           and "today_anomaly_rate" in drift.columns
                           else "today_above_fraction"))
        if drift is not None and "status" in drift.columns and (drift["status"] == DRIFT).any():
            alerts.append(x)
    return History(tuple(n.date for n in inputs.history), scorer,
                   {q: tuple(v) for q, v in quantiles.items()}, tuple(rate), tuple(alerts))


def history_section(inputs: RunInputs, dataset: str) -> str:
    """The dataset's score quantiles and anomaly rate over the last nights, alerts marked."""
    if not is_nightly(inputs):
        return ""
    history = history_series(inputs, dataset)
    nights = len(history.dates)
    parts = [f"<h3>Last {nights} night(s)</h3>"]
    if history.empty:
        return "".join(parts) + note("No night has a summary or drift row for this dataset.")
    xs = list(range(nights))
    ticks = _date_ticks(history.dates)
    x_range = (-0.5, nights - 0.5)
    lines = [svg.Series(q.removeprefix("score_"), xs, v, svg.colour(i), markers=True)
             for i, (q, v) in enumerate(history.quantiles.items())]
    finite_rate = [v for v in history.rate if not math.isnan(v)]
    parts.append('<div class="charts">')
    parts.append(svg.line_chart(
        lines, title=f"Score quantiles ({history.scorer}), {dataset}", x_label="night",
        y_label="final score", x_range=x_range,
        y_range=svg.padded_range([v for q in history.quantiles.values() for v in q]),
        x_ticks=ticks, alerts=history.alerts))
    if finite_rate:
        parts.append(svg.line_chart(
            [svg.Series("anomaly rate", xs, history.rate, svg.colour(4), markers=True)],
            title=f"Anomaly rate, {dataset}", x_label="night",
            y_label="share of queries flagged", x_range=x_range,
            y_range=(0.0, (max(finite_rate) * 1.1) or 1.0), x_ticks=ticks,
            alerts=history.alerts))
    parts.append("</div>")
    if not finite_rate:
        parts.append(note("No night has a drift file for this dataset: no anomaly rate."))
    alerted = ", ".join(history.dates[x] for x in history.alerts) or "none"
    parts.append(note(f"Pooled quantiles from each night's summary; anomaly rate (the share "
                      f"of decided queries flagged) from each night's drift file. Nights "
                      f"with a drift alert: {alerted}."))
    return "".join(parts)


def _date_ticks(dates: Sequence[str], most: int = 8) -> list[tuple[float, str]]:
    """At most ``most`` date ticks (``MM-DD``, evenly spaced, the last always shown)."""
    step = max(1, math.ceil(len(dates) / most))
    keep = sorted(set(range(len(dates) - 1, -1, -step)))
    return [(i, dates[i][5:] if len(dates[i]) == 10 else dates[i]) for i in keep]
