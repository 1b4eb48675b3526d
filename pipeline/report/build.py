"""Building one date's report folder: read the committed outputs, copy the images, render the
page, write it beside them and drop what an earlier build of the date left."""
from __future__ import annotations

import datetime as dt
import logging
import posixpath
from typing import Callable, Mapping

import fsspec

from pipeline.core.layout import output_fs, partition_name
from pipeline.report import sections
from pipeline.report.inputs import RunInputs, read_inputs
from pipeline.report.page import document
from pipeline.report.thumbnails import IMAGES_DIR, Thumbnail, copy_thumbnails

LOG = logging.getLogger(__name__)

REPORT_DIR = "report"
INDEX = "index.html"
#: What a section that failed to build says instead (the rest of the page still renders).
SECTION_FAILED = "This section could not be built"


def report_dir(output: str, run_date: str) -> str:
    """The folder of a date's report: ``OUT/report/run_date=<date>``."""
    return f"{output.rstrip('/')}/{REPORT_DIR}/{partition_name(run_date)}"


def _safe(name: str, make: Callable[[], str]) -> str:
    """``make()``, or a note saying the section failed (logged with its traceback): one
    section's surprise about the data must not cost the whole report."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - see docstring
        LOG.exception("Report section %s failed", name)
        return sections.note(f"{SECTION_FAILED} ({name}): {type(exc).__name__}: {exc}",
                             "warning")


def render(inputs: RunInputs, thumbs: Mapping[str, Thumbnail], *, top_n: int,
           generated_at: str) -> str:
    """The page for ``inputs`` with the thumbnails already copied."""
    body = [_safe("header", lambda: sections.header(inputs, generated_at))]
    if inputs.scores.empty:
        body.append(sections.nothing_scored(inputs))
    else:
        body.append(_safe("overview", lambda: sections.overview(inputs)))
    if sections.is_nightly(inputs):
        body.append(_safe("drift", lambda: sections.drift_section(inputs)))
    if not inputs.scores.empty:
        for index, dataset in enumerate(inputs.datasets, 1):
            history = _safe(f"history of {dataset}",
                            lambda: sections.history_section(inputs, dataset))
            body.append(_safe(f"dataset {dataset}", lambda: sections.dataset_section(
                inputs, sections.dataset_view(inputs, dataset), index, top_n, thumbs, history)))
    body.append(_safe("errors", lambda: sections.errors_section(inputs)))
    return document(f"Anomaly scoring report {inputs.run_date}", body)


def _prune(folder: str, keep: set[str]) -> None:
    """Remove files under ``folder`` (URL) that this build did not write (``keep``: paths
    relative to it): thumbnails of queries no longer shown."""
    fs, root = output_fs(folder)
    fs.invalidate_cache(root)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return
    stale = [p for p in found if posixpath.relpath(p, root) not in keep]
    for path in stale:
        fs.rm_file(path)
    if stale:
        LOG.info("Report: removed %d files of an earlier build", len(stale))


def build_report(output: str, run_date: str, *, top_n: int = 8,
                 history_nights: int = 14) -> str:
    """Write the report of ``run_date``'s committed outputs under ``output`` and return the
    URL of its page, ``OUT/report/run_date=<date>/index.html``.

    The folder is self-contained (the page, its inline charts and PNG thumbnails of the
    images it shows) so it opens from a file share; every file goes through fsspec, so
    ``output`` may be any fsspec URL. ``top_n`` is the number of most anomalous queries shown
    per dataset, ``history_nights`` the nights the history plots cover (this one included).
    Missing optional inputs leave a note in their section; an empty scores table gives a
    page with the errors.
    """
    if not output.strip("/ "):
        raise ValueError(f"output must name an output root, got {output!r}")
    if top_n < 0 or history_nights < 0:
        raise ValueError(f"top_n and history_nights must be >= 0, got {top_n}, {history_nights}")
    folder = report_dir(output, run_date)
    inputs = read_inputs(output, run_date, history_nights=history_nights)
    fs, root = output_fs(folder)
    fs.makedirs(f"{root}/{IMAGES_DIR}", exist_ok=True)
    uris, outlines = sections.shown_images(inputs, top_n)
    thumbs = copy_thumbnails(uris, folder, outlines=outlines)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = render(inputs, thumbs, top_n=top_n, generated_at=generated)
    index = f"{folder}/{INDEX}"
    with fsspec.open(index, "w", encoding="utf-8") as f:
        f.write(page)
    _prune(folder, {INDEX} | {t.path for t in thumbs.values() if t.path})
    LOG.info("Report of %s: %s (%d datasets, %d images)", run_date, index,
             len(inputs.datasets), sum(t.path is not None for t in thumbs.values()))
    return index
