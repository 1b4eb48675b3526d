"""The report's parts on hand-made inputs: number formatting, curves, SVG charts, thumbnails,
and pages built from outputs that lack optional files and columns."""
from __future__ import annotations

import io
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.report import build_report, format_metric, report_dir
from pipeline.report import curves, svg
from pipeline.report.build import SECTION_FAILED, render
from pipeline.report.inputs import Night, RunInputs
from pipeline.report.sections import dataset_view, gallery_items, history_series, shown_images
from pipeline.report.thumbnails import THUMBNAIL_SIZE, copy_thumbnails, make_thumbnail
from tests.report.pagecheck import local_target, read_page

# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean, std, text", [
    (0.9123, 0.0134, "0.912 ± 0.013"),
    (1.0, 0.0, "1.000 ± 0.000"),
    (np.float64(0.5), np.float32(0.25), "0.500 ± 0.250"),
    (0.7, None, "0.700"),
    (0.7, math.nan, "0.700"),
    (None, 0.1, "n/a"),
    (math.nan, math.nan, "n/a"),
    (pd.NA, 0.1, "n/a"),
])
def test_format_metric(mean, std, text):
    assert format_metric(mean, std) == text


# --------------------------------------------------------------------------------------------
# Curves and bins
# --------------------------------------------------------------------------------------------


def test_curve_areas_equal_sklearn_and_ignore_unlabelled_rows():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300).astype(float)
    scores = labels * 0.5 + rng.normal(size=300)
    labels[:20] = np.nan  # unlabelled queries must not enter the curves
    scores[20] = np.nan
    keep = ~np.isnan(labels) & ~np.isnan(scores)
    roc = curves.roc(labels, scores)
    pr = curves.precision_recall(labels, scores)
    assert roc.area == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
    assert pr.area == pytest.approx(average_precision_score(labels[keep], scores[keep]))
    assert (roc.x[0], roc.y[0], roc.x[-1], roc.y[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(roc.x) >= 0) and np.all(np.diff(pr.x) >= 0)
    assert len(roc.x) <= curves.MAX_CURVE_POINTS + 1


def test_curves_need_both_classes():
    assert curves.roc(np.array([0, 0, np.nan]), np.array([0.1, 0.2, 0.3])) is None
    assert curves.precision_recall(np.array([1.0, 1.0]), np.array([0.1, 0.2])) is None


def test_thin_keeps_the_ends_and_the_limit():
    x = np.arange(10_000.0)
    tx, ty = curves.thin(x, x * 2, limit=50)
    assert len(tx) <= 50 and tx[0] == 0 and tx[-1] == 9_999 and np.all(ty == tx * 2)
    assert len(curves.thin(x[:10], x[:10], limit=50)[0]) == 10


def test_bins_and_shares():
    edges = curves.bin_edges(np.array([0.0, 1.0, 2.0, np.nan, 4.0]))
    assert edges[0] == 0.0 and edges[-1] == 4.0
    shares = curves.shares(np.array([0.0, 1.0, 2.0, np.nan, 4.0]), edges)
    assert shares.sum() == pytest.approx(1.0)  # the maximum lands in the last bin too
    single = curves.bin_edges(np.array([3.0, 3.0]))
    assert single[0] < 3.0 < single[-1]
    assert curves.shares(np.array([np.nan]), single).sum() == 0


# --------------------------------------------------------------------------------------------
# SVG
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lo, hi", [(0, 1), (0.0012, 0.0031), (-3, 250), (0.5, 0.5000001)])
def test_nice_ticks_are_round_and_inside(lo, hi):
    ticks = svg.nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 2, 5, 10)


def test_line_chart_is_wellformed_escapes_names_and_breaks_at_nan():
    chart = svg.line_chart(
        [svg.Series('<script>alert("x")</script>', [0, 1, 2, 3], [0.1, math.nan, 0.3, 0.4],
                    "#123456")],
        title="a & b", x_label="x", y_label="y", x_range=(0, 3), y_range=(0, 1), alerts=[2])
    root = ET.fromstring(chart)  # well-formed XML, or this raises
    assert "<script>" not in chart and "&lt;script&gt;" in chart
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert [len(p.get("points").split()) for p in lines] == [1, 2]  # NaN breaks the line
    assert len([e for e in root.iter(f"{ns}line") if e.get("class") == "alert"]) == 1


def test_histogram_bars_scale_to_the_highest_share():
    chart = svg.histogram([svg.Bars("normal", [0.5, 0.5, 0.0], "#1f77b4"),
                           svg.Bars("anomalous", [0.0, 0.25, 0.75], "#d62728")],
                          [0.0, 1.0, 2.0, 3.0], title="h", x_label="score")
    root = ET.fromstring(chart)
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if r.get("class") == "bar"]
    assert len(bars) == 4  # empty bins draw nothing
    heights = sorted(float(b.get("height")) for b in bars)
    assert heights[-1] == pytest.approx(heights[0] * 3, abs=0.05)  # 0.75 vs 0.25


# --------------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_thumbnails_shrink_keep_aspect_and_never_enlarge():
    data, w, h = make_thumbnail(_png(Image.new("RGB", (1000, 500), "red")))
    assert (w, h) == (THUMBNAIL_SIZE, THUMBNAIL_SIZE // 2)
    assert Image.open(io.BytesIO(data)).size == (w, h)
    assert make_thumbnail(_png(Image.new("L", (32, 20))))[1:] == (32, 20)
    # 16-bit grayscale goes through the job's decoder: full range → 8 bits, not clipped.
    wide = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    small = Image.open(io.BytesIO(make_thumbnail(_png(wide))[0]))
    assert small.mode == "RGB" and small.getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_images_are_left_out_with_a_reason(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (300, 300), "blue").save(good)
    bad.write_bytes(b"not an image")
    out = tmp_path / "report"
    (out / "images").mkdir(parents=True)
    thumbs = copy_thumbnails([str(good), str(bad), str(tmp_path / "gone.png"), str(good)],
                             str(out))
    assert len(thumbs) == 3
    assert thumbs[str(good)].path and (out / thumbs[str(good)].path).is_file()
    assert thumbs[str(bad)].path is None and thumbs[str(bad)].problem
    assert thumbs[str(tmp_path / "gone.png")].path is None


# --------------------------------------------------------------------------------------------
# Pages from hand-made inputs
# --------------------------------------------------------------------------------------------


def _inputs(scores: pd.DataFrame, summary: pd.DataFrame | None = None, **kw) -> RunInputs:
    scorers = tuple(dict.fromkeys(scores["scorer"])) if "scorer" in scores else ()
    base = dict(output="/nowhere", run_date="2024-05-01", scores=scores, errors=None,
                summary=summary, summary_extra={}, comparison=None, drift=None, drift_extra={},
                nightly=None, history=(Night("2024-05-01", summary, None),), scorers=scorers)
    return RunInputs(**{**base, **kw})


def test_a_scores_table_with_only_the_essential_columns_renders():
    # No label, seed, category, reference or model columns: every section copes.
    scores = pd.DataFrame({"dataset": ["d"] * 3, "scorer": ["inctrl"] * 3,
                           "final_score": [0.1, 0.9, np.nan]})
    page = render(_inputs(scores), {}, top_n=2, generated_at="now")
    assert SECTION_FAILED not in page
    found = read_page(page)
    assert [s.get("data-dataset") for s in found.sections if s.get("class") == "dataset"] == ["d"]
    assert "summary.parquet is not in this date" not in page  # unlabelled: no metrics asked
    assert "image unavailable: no image recorded" in page
    assert "No errors table is in force" in page


def test_seeds_read_as_integers_in_numeric_order():
    # A seed column with a null reads as float; seeds 2 and 10 must not sort as text.
    scores = pd.DataFrame({"dataset": ["d"] * 4, "scorer": ["inctrl"] * 4,
                           "seed": [10.0, 2.0, np.nan, 2.0], "final_score": [0.1, 0.2, 0.3, 0.4],
                           "label": [0, 1, 0, 1], "image_id": ["a", "a", "b", "b"]})
    page = render(_inputs(scores), {}, top_n=2, generated_at="now")
    assert "<dt>Seeds</dt><dd>2, 10</dd>" in page
    assert "seed 2)" in page and "2.0" not in page
    assert dataset_view(_inputs(scores), "d").seed == 2


def test_gallery_ranks_by_the_first_scorer_on_the_smallest_seed():
    scores = pd.DataFrame({
        "dataset": ["d"] * 6, "scorer": ["patchcore", "patchcore", "inctrl", "inctrl", "inctrl",
                                         "inctrl"],
        "seed": [0, 0, 1, 1, 0, 0], "image_id": ["a", "b", "a", "b", "a", "b"],
        "final_score": [9.0, 0.0, 0.9, 0.1, 0.2, 0.8], "label": [1, 0, 1, 0, 1, 0],
        "image_uri": ["ua", "ub"] * 3, "reference_ids": [["r1", "r2"]] * 6,
        "reference_uris": [["u1", "u2"]] * 6, "overlay_uri": ["oa", None] * 3})
    inputs = _inputs(scores, scorers=("inctrl", "patchcore"))
    items = gallery_items(dataset_view(inputs, "d"), top_n=5)
    assert [(i.image_id, i.score) for i in items] == [("b", 0.8), ("a", 0.2)]
    assert [i.shown_uri for i in items] == ["ub", "oa"]  # the overlay when there is one
    assert items[0].references == (("r1", "u1"), ("r2", "u2"))
    assert sorted(set(shown_images(inputs, 5)[0])) == ["oa", "u1", "u2", "ub"]


def test_overlays_and_references_become_local_thumbnails(tmp_path):
    paths = {}
    for name, colour in [("query", "red"), ("overlay", "green"), ("ref1", "blue"),
                         ("ref2", "white")]:
        paths[name] = str(tmp_path / f"{name}.png")
        Image.new("RGB", (512, 384), colour).save(paths[name])
    scores = pd.DataFrame({"dataset": ["d"], "scorer": ["inctrl"], "seed": [0],
                           "image_id": ["q"], "final_score": [0.5], "label": [1],
                           "category": ["c"], "image_uri": [paths["query"]],
                           "overlay_uri": [paths["overlay"]],
                           "reference_ids": [["r1", "r2"]],
                           "reference_uris": [[paths["ref1"], paths["ref2"]]]})
    folder = tmp_path / "report"
    (folder / "images").mkdir(parents=True)
    inputs = _inputs(scores)
    thumbs = copy_thumbnails(shown_images(inputs, 8)[0], str(folder))
    page = read_page(render(inputs, thumbs, top_n=8, generated_at="now"))
    assert len(page.images) == 3  # the overlay (not the plain image) and two references
    colours = []
    for src in page.images:
        with Image.open(local_target(str(folder), src)) as im:
            assert max(im.size) <= THUMBNAIL_SIZE
            colours.append(im.convert("RGB").getpixel((0, 0)))
    assert colours == [(0, 128, 0), (0, 0, 255), (255, 255, 255)]


def test_pixel_metrics_are_shown_when_the_summary_has_them():
    scores = pd.DataFrame({"dataset": ["d"] * 2, "scorer": ["inctrl"] * 2, "seed": [0, 0],
                           "final_score": [0.1, 0.9], "label": [0, 1]})
    row = dict(level="dataset_mean", dataset="d", scorer="inctrl", category="*mean*", k=4,
               n_seeds=1, query_count=2, anomalous_count=1, normal_count=1, unlabeled_count=0,
               auroc_mean=1.0, auroc_std=0.0, auprc_mean=1.0, auprc_std=0.0, f1_max_mean=1.0,
               f1_max_std=0.0, pixel_auroc_mean=0.87654, pixel_auroc_std=0.01234,
               aupro_mean=np.nan, aupro_std=np.nan)
    page = render(_inputs(scores, pd.DataFrame([row])), {}, top_n=1, generated_at="now")
    cells = read_page(page).metric_cells("dataset_mean")
    assert cells[("d", "inctrl", "*mean*", "4", "pixel_auroc")] == "0.877 ± 0.012"
    assert "Pixel AUROC" in page
    # A pixel metric without a value for the dataset (no masks) is left out, not "n/a".
    assert ("d", "inctrl", "*mean*", "4", "aupro") not in cells and "AUPRO" not in page
    without = render(_inputs(scores, pd.DataFrame([row]).drop(
        columns=["pixel_auroc_mean", "pixel_auroc_std", "aupro_mean", "aupro_std"])), {},
        top_n=1, generated_at="now")
    assert "Pixel AUROC" not in without and "AUPRO" not in without


def test_text_from_data_is_escaped_everywhere():
    evil = '<img src="http://x/y.png" onerror="alert(1)">'
    scores = pd.DataFrame({"dataset": [evil] * 2, "scorer": [evil] * 2, "seed": [0, 0],
                           "final_score": [0.1, 0.9], "label": [0, 1], "category": [evil] * 2,
                           "image_id": [evil, "b"], "run_id": [evil] * 2,
                           "reference_ids": [[evil], [evil]]})
    errors = pd.DataFrame({"dataset": [evil], "stage": [evil], "reason": [evil]})
    page = render(_inputs(scores, errors=errors), {}, top_n=2, generated_at="now")
    assert evil not in page and "onerror=\"alert" not in page
    found = read_page(page)
    assert found.images == [] and not any("http" in v for _, _, v in found.links)


# --------------------------------------------------------------------------------------------
# Whole builds on roots without outputs
# --------------------------------------------------------------------------------------------


def test_a_date_without_outputs_gives_a_page_that_says_so(tmp_path):
    out = str(tmp_path / "out")
    index = build_report(out, "2024-01-01")
    assert index == f"{report_dir(out, '2024-01-01')}/index.html"
    with open(index, encoding="utf-8") as f:
        page = f.read()
    assert "No queries were scored" in page and "No errors table is in force" in page
    assert SECTION_FAILED not in page
    assert sorted(os.listdir(os.path.dirname(index))) == ["images", "index.html"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="top_n"):
        build_report(str(tmp_path), "2024-01-01", top_n=-1)
    with pytest.raises(ValueError, match="output root"):
        build_report("", "2024-01-01")  # would write /report/... otherwise


def _pooled(dataset: str, p50: float) -> dict:
    return dict(level="dataset_pooled", dataset=dataset, scorer="inctrl", category="*pooled*",
                k=4, score_p50=p50, score_p90=p50 + 0.1, score_p99=p50 + 0.2)


def test_history_without_drift_files_plots_quantiles_only():
    # Several score runs on one root: summaries per date, no drift and no nightly.json.
    scores = pd.DataFrame({"dataset": ["d"] * 2, "scorer": ["inctrl"] * 2, "seed": [0, 0],
                           "final_score": [0.1, 0.9], "label": [pd.NA, pd.NA]})
    nights = (Night("2024-04-29", pd.DataFrame([_pooled("d", 0.2)]), None),
              Night("2024-04-30", None, None),
              Night("2024-05-01", pd.DataFrame([_pooled("d", 0.4), _pooled("other", 9.0)]), None))
    inputs = _inputs(scores, history=nights)
    history = history_series(inputs, "d")
    assert history.dates == ("2024-04-29", "2024-04-30", "2024-05-01")
    assert history.quantiles["score_p50"][0] == 0.2 and history.quantiles["score_p50"][2] == 0.4
    assert math.isnan(history.quantiles["score_p50"][1])  # a night without a summary: a gap
    assert history.alerts == () and all(math.isnan(r) for r in history.rate)
    page = render(inputs, {}, top_n=1, generated_at="now")
    assert SECTION_FAILED not in page
    assert "Score quantiles (inctrl), d" in page and "Alert rate" not in page
    assert "no anomaly rate" in page and "No drift file for this date" in page
