"""The run report of a real scoring run: the job runs on a small demo set (tiny CLIP test
backbone and a random MobileNetV2 for PatchCore, two seeds), plus an unlabelled dataset whose
name needs HTML escaping and a query image that cannot be decoded; then the report is built
and read back, as HTML and through a headless Chromium.

The browser test needs Chromium on PATH (``apt-get install -y --no-install-recommends
chromium``; ``./run_local.sh --setup test`` installs it when run as root) and is skipped
without it. It keeps its screenshot at :data:`SCREENSHOT` (and under the test's tmp_path),
printed in the test output.
"""
from __future__ import annotations

import dataclasses
import html
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import ScoreConfig
from pipeline.core.demo_data import generate_demo
from pipeline.core.layout import current_record, read_partition, summary_dir
from pipeline.core.make_manifest import make_manifest
from pipeline.core.manifest import write_manifest
from pipeline.core.schemas import ERRORS, SUMMARY
from pipeline.model.backbone import tiny_spec
from pipeline.report import build_report, report_dir
from pipeline.report.build import SECTION_FAILED
from pipeline.report.formatting import format_score
from pipeline.report.thumbnails import THUMBNAIL_SIZE, thumbnail_name
from pipeline.run import run_score
from tests.report.pagecheck import (Page, expected_comparison, expected_decisions,
                                    expected_metrics, local_target, read_page)

RUN_DATE = "2024-06-03"
SEEDS = (0, 1)
K = 2
TOP_N = 3
SCORERS = ("inctrl", "patchcore")
#: Two calibration images per category plus the one reference the draw leaves: n = 3
#: reaches this false-alarm rate, so queries get decisions and flagged ones defect masks.
ALPHA, CALIBRATION = 0.25, 2
#: A dataset without labels, named so that unescaped text would break the page.
UNLABELLED = 'line <7> & "co"'
BROKEN_ID = "broken-query"
#: Where the browser test leaves its screenshot for people to look at (overwritten per run).
SCREENSHOT = Path(tempfile.gettempdir()) / "inctrl-report-browser-test" / "screenshot.png"


@dataclass(frozen=True)
class Built:
    output: str
    index: str
    html: str
    page: Page
    scores: pd.DataFrame
    errors: pd.DataFrame
    summary: pd.DataFrame
    comparison: pd.DataFrame

    @property
    def folder(self) -> str:
        return os.path.dirname(self.index)

    @property
    def labelled(self) -> set[str]:
        return set(self.scores.loc[self.scores["label"].notna(), "dataset"])


def _manifest(root: Path) -> pd.DataFrame:
    frame = make_manifest(generate_demo(str(root / "data"), image_size=32, n_train=3,
                                        n_test_good=2, n_test_defect_per_type=1,
                                        n_calibration=CALIBRATION))
    first = sorted(frame["dataset"].unique())[0]
    # The unlabelled dataset gets copies of the first one's images under ids of its own.
    unlabelled = frame[frame["dataset"] == first].copy()
    unlabelled["dataset"] = UNLABELLED
    unlabelled.loc[unlabelled["role"] == "query", "label"] = pd.NA
    if "mask_uri" in unlabelled.columns:  # no labels, no masks either
        unlabelled["mask_uri"] = None
    (root / "unlabelled").mkdir()
    copies = []
    for i, uri in enumerate(unlabelled["image_uri"]):
        copies.append(str(root / "unlabelled" / f"{i}{Path(uri).suffix}"))
        shutil.copyfile(uri, copies[-1])
    unlabelled["image_uri"] = copies
    unlabelled["image_id"] = [f"unlabelled-{i}" for i in range(len(copies))]
    broken = frame[(frame["dataset"] == first) & (frame["role"] == "query")].head(1).copy()
    broken["image_uri"] = str(root / "broken.png")
    broken["image_id"] = BROKEN_ID
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return pd.concat([frame, unlabelled, broken], ignore_index=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("report_run")
    path = str(root / "manifest.parquet")
    write_manifest(_manifest(root), path)
    output = str(root / "out")
    # Anomaly-map files (overlays in the gallery) when this version of the job writes them.
    maps = ({"write_anomaly_maps": True}
            if "write_anomaly_maps" in {f.name for f in dataclasses.fields(ScoreConfig)} else {})
    config = ScoreConfig(manifest=path, output=output, k=K, seeds=SEEDS, backbone=tiny_spec(),
                         run_date=RUN_DATE, run_id="report-run", batch_size=4, scorers=SCORERS,
                         options=dict(cnn_backbone="mobilenet_v2", cnn_weights="random:0"),
                         false_alarm_rate=ALPHA, **maps)
    run_score(config, beam_args=[])
    index = build_report(output, RUN_DATE, top_n=TOP_N)
    with open(index, encoding="utf-8") as f:
        text = f.read()
    folder = summary_dir(output, RUN_DATE)
    return Built(output, index, text, read_page(text),
                 read_partition(output, RUN_DATE).to_pandas(),
                 read_partition(output, RUN_DATE, ERRORS).to_pandas(),
                 pd.read_parquet(f"{folder}/summary.parquet"),
                 pd.read_parquet(f"{folder}/comparison.parquet"))


def _dataset_sections(page: Page) -> list[str]:
    return [s["data-dataset"] for s in page.sections if s.get("class") == "dataset"]


def _section_html(text: str, dataset: str) -> str:
    """The HTML of one dataset's section."""
    found = re.search(r'<section class="dataset" id="[^"]*" data-dataset="'
                      + re.escape(html.escape(dataset, quote=True)) + '">', text)
    assert found, f"no section of {dataset!r}"
    return text[found.start():text.index("</section>", found.start())]


# --------------------------------------------------------------------------------------------
# The page as HTML
# --------------------------------------------------------------------------------------------


def test_the_page_is_where_the_layout_says(built):
    assert built.index == f"{report_dir(built.output, RUN_DATE)}/index.html"
    assert built.index.endswith(f"/report/run_date={RUN_DATE}/index.html")
    assert SECTION_FAILED not in built.html


def test_every_image_is_a_small_copy_inside_the_report_folder(built):
    assert built.page.images, "the gallery shows no image"
    for src in built.page.images:
        target = local_target(built.folder, src)
        with Image.open(target) as im:
            assert im.format == "PNG" and max(im.size) <= THUMBNAIL_SIZE
    # One query image (or overlay) per gallery entry, plus its references when recorded.
    refs = K if "reference_uris" in built.scores.columns else 0
    shown = sum(len(ids) for ids in built.page.gallery.values())
    assert len(built.page.images) == shown * (1 + refs)
    # Nothing else in the folder: thumbnails of this page only.
    files = {os.path.relpath(os.path.join(d, n), built.folder)
             for d, _, names in os.walk(built.folder) for n in names}
    assert files == {"index.html"} | {src for src in built.page.images}


def test_the_page_makes_no_external_request(built):
    assert built.page.links, "the page has no links at all"
    for tag, attribute, value in built.page.links:
        assert "http" not in value.lower(), f"<{tag} {attribute}={value!r}>"
        if attribute == "href":
            assert value.startswith("#"), f"<{tag} href={value!r}> leaves the page"
    assert not built.page.tags & {"script", "link", "iframe", "object", "embed", "base"}
    assert "@import" not in built.html and "url(" not in built.html


def test_every_dataset_has_a_section(built):
    expected = sorted(set(built.scores["dataset"]) | set(built.errors["dataset"].dropna()))
    assert len(expected) == 4 and UNLABELLED in expected
    assert _dataset_sections(built.page) == expected


def test_the_metrics_on_the_page_are_the_summarys(built):
    labelled = built.labelled
    assert UNLABELLED not in labelled and len(labelled) == 3
    for level in ("dataset_mean", "dataset_pooled", "category"):
        want = expected_metrics(built.summary, level, labelled)
        assert want, level
        assert built.page.metric_cells(level) == want, level
    scorers = [s for s in SCORERS if f"{s}_auroc_mean" in built.comparison.columns]
    assert scorers == list(SCORERS)
    assert built.page.metric_cells("comparison") == expected_comparison(built.comparison,
                                                                        scorers)


def test_the_decisions_on_the_page_are_the_summarys(built):
    want = expected_decisions(built.summary)
    assert want and built.page.decision_cells() == want
    # The run has decisions (n + 1 >= 1 / alpha) for every category.
    rows = built.summary[built.summary["level"] == "category"]
    assert rows["decision_note"].isna().all() and (rows["calibration_size"] >= 3).all()
    assert "conformal p-value" in built.html


def test_flagged_queries_show_their_decision_and_defect_mask_outline(built):
    first = built.scores[(built.scores["scorer"] == SCORERS[0])
                         & (built.scores["seed"] == min(SEEDS))]
    for dataset, group in first.groupby("dataset"):
        section = _section_html(built.html, dataset)
        for row in group.sort_values("final_score", ascending=False,
                                     kind="stable").head(TOP_N).to_dict("records"):
            if row["is_anomalous"] is True or row["is_anomalous"] == 1:
                assert f"flagged (p = {format_score(row['anomaly_p_value'])})" in section
            elif row["is_anomalous"] is False or row["is_anomalous"] == 0:
                assert f"not flagged (p = {format_score(row['anomaly_p_value'])})" in section
    # Every flagged query with a map has a binary mask PNG of its image's size.
    flagged = built.scores[built.scores["is_anomalous"].fillna(False).astype(bool)
                           & built.scores["pixel_decision_threshold"].notna()]
    assert len(flagged) > 0
    for row in flagged.to_dict("records"):
        with Image.open(row["defect_mask_uri"]) as mask, Image.open(row["image_uri"]) as image:
            values = np.asarray(mask)
            assert mask.size == image.size and set(np.unique(values)) <= {0, 255}
        assert row["defect_area_fraction"] == pytest.approx((values > 0).mean())
    # A flagged query in a gallery is shown as its overlay with the mask's outline drawn on.
    outlined = 0
    for dataset, group in first.groupby("dataset"):
        top = group.sort_values("final_score", ascending=False, kind="stable").head(TOP_N)
        for row in top.to_dict("records"):
            if row["is_anomalous"] is True and isinstance(row["defect_mask_uri"], str):
                assert thumbnail_name(row["overlay_uri"], row["defect_mask_uri"]) in \
                    built.page.images
                outlined += 1
    assert built.html.count("outlined defect:") == outlined


def test_the_gallery_shows_the_first_scorers_top_queries_of_the_smallest_seed(built):
    for dataset, group in built.scores.groupby("dataset"):
        mine = group[(group["scorer"] == SCORERS[0]) & (group["seed"] == min(SEEDS))]
        top = mine.sort_values("final_score", ascending=False, kind="stable")
        assert built.page.gallery[dataset] == top["image_id"].head(TOP_N).tolist()


def test_labelled_datasets_get_curves_and_histograms_per_scorer(built):
    for dataset in built.labelled:
        # ROC + precision-recall, then one histogram per scorer.
        assert built.page.charts[dataset] == 2 + len(SCORERS), dataset
        section = _section_html(built.html, dataset)
        assert "ROC, " in section and "(AUROC " in section and "normal (n=" in section


def test_the_unlabelled_dataset_gets_only_label_free_parts(built):
    section = _section_html(built.html, UNLABELLED)
    assert "ROC" not in section and "Image AUROC" not in section and "anomalous (n=" not in section
    assert "all queries (n=" in section
    assert built.page.charts[UNLABELLED] == len(SCORERS)
    pooled = built.summary[(built.summary["dataset"] == UNLABELLED)
                           & (built.summary["level"] == "dataset_pooled")]
    cells = {(c.attrs["data-scorer"], c.attrs["data-quantile"]): c.text
             for c in built.page.cells_of("quantile", UNLABELLED)}
    assert cells == {(r["scorer"], q): format_score(r[q]) for r in pooled.to_dict("records")
                     for q in ("score_p50", "score_p90", "score_p99", "score_max")}
    assert len(built.page.gallery[UNLABELLED]) == TOP_N


def test_text_from_data_is_escaped(built):
    assert UNLABELLED not in built.html
    assert html.escape(UNLABELLED, quote=True) in built.html


def test_errors_are_counted_by_stage(built):
    assert BROKEN_ID in set(built.errors["image_id"])
    counts = {c.attrs["data-stage"]: int(c.text) for c in built.page.cells_of("count")}
    assert counts == built.errors["stage"].value_counts().to_dict()
    assert counts.get("decode_image", 0) >= len(SEEDS)  # a query's failure, once per seed


# --------------------------------------------------------------------------------------------
# Other builds of the same outputs
# --------------------------------------------------------------------------------------------


def test_a_rebuild_drops_the_thumbnails_it_no_longer_shows(built, tmp_path):
    output = str(tmp_path / "out")
    shutil.copytree(built.output, output)
    index = build_report(output, RUN_DATE, top_n=1)
    with open(index, encoding="utf-8") as f:
        page = read_page(f.read())
    folder = os.path.dirname(index)
    left = sorted(os.listdir(os.path.join(folder, "images")))
    assert left == sorted({os.path.basename(src) for src in page.images})
    assert len(left) < len(os.listdir(os.path.join(built.folder, "images")))


def test_a_missing_summary_leaves_a_note_and_the_rest(built, tmp_path):
    output = str(tmp_path / "out")
    shutil.copytree(built.output, output)
    record = current_record(output, RUN_DATE)
    for _, rel in record.files(SUMMARY):
        if rel.endswith("summary.parquet"):
            os.remove(os.path.join(output, rel))
    os.remove(f"{summary_dir(output, RUN_DATE)}/summary.parquet")
    with open(build_report(output, RUN_DATE, top_n=TOP_N), encoding="utf-8") as f:
        text = f.read()
    page = read_page(text)
    assert SECTION_FAILED not in text
    assert text.count("summary.parquet is not in this date") == len(built.labelled)
    assert page.metric_cells("dataset_mean") == {}
    assert _dataset_sections(page) == _dataset_sections(built.page)
    assert page.gallery == built.page.gallery


def test_the_report_reads_the_committed_files_not_the_published_copies(built, tmp_path):
    # The copies in summary/run_date=<d>/ are written after the record, for people; a stale
    # copy must not change the report.
    output = str(tmp_path / "out")
    shutil.copytree(built.output, output)
    stale = built.summary.assign(auroc_mean=0.123, auroc_std=0.0)
    stale.to_parquet(f"{summary_dir(output, RUN_DATE)}/summary.parquet", index=False)
    with open(build_report(output, RUN_DATE, top_n=TOP_N), encoding="utf-8") as f:
        page = read_page(f.read())
    assert page.metric_cells("dataset_mean") == built.page.metric_cells("dataset_mean")


def test_the_report_is_written_through_fsspec_to_object_storage(built):
    output = f"memory://report-{uuid.uuid4().hex[:8]}/out"
    fs = fsspec.filesystem("memory")
    for folder, _, names in os.walk(built.output):
        for name in names:
            if "/report/" in f"{folder}/":
                continue
            local = os.path.join(folder, name)
            fs.pipe(f"{output}/{os.path.relpath(local, built.output)}",
                    Path(local).read_bytes())
    index = build_report(output, RUN_DATE, top_n=TOP_N)
    assert index == f"{output}/report/run_date={RUN_DATE}/index.html"
    page = read_page(fs.cat(index).decode())
    assert page.metric_cells("dataset_mean") == built.page.metric_cells("dataset_mean")
    assert page.gallery == built.page.gallery
    folder = index.rpartition("/")[0]
    for src in page.images:
        assert fs.exists(f"{folder}/{src}")
    fs.rm(output.removeprefix("memory://").split("/")[0], recursive=True)


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------

#: Test-only: marks <body> once the page has loaded, with the images that did not render.
#: The report itself carries no script; this goes into a copy of the page beside it.
_LOAD_CHECK = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) {
    return !(i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-broken",
                             broken.map(function (i) { return i.getAttribute("src"); }).join(" "));
  document.body.setAttribute("data-checked", "yes");
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("Chromium is not installed, so the report's browser test is skipped. Install "
                "it with `apt-get install -y --no-install-recommends chromium` (Debian/Ubuntu, "
                "as root; `./run_local.sh --setup test` does it), then rerun.")


def _browse(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(profile)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
    return done


def test_a_browser_renders_the_page_with_every_image_and_number(built, tmp_path,
                                                               record_property):
    binary = _chromium()
    profile = tmp_path / "profile"
    shot = tmp_path / "screenshot.png"
    _browse(binary, profile, f"--screenshot={shot}", "--window-size=1280,4000",
            Path(built.index).as_uri())
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    record_property("screenshot", str(SCREENSHOT))
    print(f"\nReport screenshot: {SCREENSHOT} (this run's copy: {shot})")

    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        rgb = np.asarray(im.convert("RGB"))
    gray = rgb.mean(axis=2)
    assert gray.std() > 15, f"the screenshot looks blank (pixel std {gray.std():.1f})"
    colours = np.unique(rgb.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200, f"only {len(colours)} distinct colours"
    assert (gray < 250).mean() > 0.05, "almost every pixel is white"

    check = Path(built.folder) / "_browser_check.html"
    check.write_text(built.html.replace("</body>", _LOAD_CHECK + "</body>"), encoding="utf-8")
    try:
        dom = read_page(_browse(binary, profile, "--dump-dom", check.as_uri()).stdout)
    finally:
        check.unlink()
    assert dom.body.get("data-checked") == "yes", "the page's load event never came"
    assert dom.body.get("data-images-broken") == "", dom.body.get("data-images-broken")
    assert int(dom.body["data-images-total"]) == len(built.page.images) > 0
    # The numbers as the browser holds them are the summary's.
    for level in ("dataset_mean", "category"):
        assert dom.metric_cells(level) == expected_metrics(built.summary, level, built.labelled)
    assert _dataset_sections(dom) == _dataset_sections(built.page)
