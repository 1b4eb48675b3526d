"""The benchmarks still run, and what they count is what the job did (not timed).

The GPU benchmark runs on a lent GPU machine with minutes to spare, so a crash there costs
a whole measurement; here it runs its whole path on the CPU with the tiny backbone, in bf16
(the GPU default; on the CPU the tower's own weights in bf16, so fp32 on a CPU without native
bf16, which refuses it) and with the job's decode thread pool. The figures are not
checked, only that every stage ran and that the job's counters add up.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench import gpu, throughput
from pipeline.model.precision import cpu_bf16

TINY = ["--backbone", "InCTRL-Tiny-ViT-TESTONLY", "--pretrained", "random:0"]
CPU_PRECISION = "bf16" if cpu_bf16().native else "fp32"


@pytest.fixture(scope="module")
def gpu_result(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-bench")
    out = work / "gpu.json"
    rc = gpu.main(["--device", "cpu", "--precision", CPU_PRECISION, *TINY, "--batch-size", "8",
                   "--n-forward", "16", "--stage-n", "16", "--distinct", "12", "--e2e-n", "20",
                   "--image-size", "48", "--decode-procs", "2", "--decode-threads", "2",
                   "--workdir", str(work), "--json", str(out)])
    assert rc == 0
    with open(out) as f:
        return json.load(f)


def test_gpu_bench_runs_every_stage(gpu_result, capsys):
    res = gpu_result
    assert res["precision"] == CPU_PRECISION
    assert res["decode_threads"] == 2 and "skipped" not in res
    rates = [res["bare_ips"], res["stage_ips"], res["stage_on_device_ips"],
             res["decode_1proc_ips"], res["decode_threads_ips"], res["decode_nproc_ips"],
             *res["score_math_ips"].values()]
    assert set(res["score_math_ips"]) == {"training-free", "with heads"}
    assert all(r > 0 for r in rates)


def test_gpu_bench_end_to_end_counts_add_up(gpu_result):
    e2e = gpu_result["e2e"]
    k = gpu_result["k"]
    assert e2e["images"] == 20 and e2e["fixed_images"] == k + 1
    assert e2e["reference_forwards"] == k
    assert e2e["query_forwards"] == e2e["queries_scored"] == 20 - k
    assert e2e["reference_sets_prepared"] == 1 and e2e["prompt_sets_encoded"] == 1
    assert 0 < e2e["fixed_seconds"] and 0 < e2e["query_model_s"] < e2e["seconds"]


def test_throughput_bench_counts_every_forward(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = throughput.main(["--n", "12", *TINY, "--image-size", "48", "--batch-size", "4",
                          "--bare-repeats", "1", "--workdir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    runs = res["pipeline"]
    assert set(runs) == {"cold", "warm", "fixed"}
    for name, expected_queries in (("cold", 8), ("warm", 8), ("fixed", 1)):
        run = runs[name]
        assert run["reference_forwards"] == 4, name
        assert run["query_forwards"] == run["queries_scored"] == expected_queries, name
    assert runs["cold"]["prompt_sets_encoded"] == 1 and runs["warm"]["prompt_sets_from_cache"] == 1
    assert "Markdown row for bench/RESULTS.md" in capsys.readouterr().out


# --------------------------------------------------------------- scorer quality and cost

# Random weights throughout, and a small timm ViT in DINO's place (any timm ViT fits there).
SMALL_MODELS = ["--cnn-weights", "random:0", "--vit-backbone", "vit_tiny_patch16_224",
                "--vit-image-size", "32"]


def test_photo_set_is_an_mvtec_tree_with_its_manifest(tmp_path):
    import numpy as np
    from PIL import Image

    from bench.photo_set import DATASET, PhotoSet, write_photo_manifest
    from tests.model.scorers.photos import DEFECT_KINDS

    photos = PhotoSet(categories=("cat", "brick"), n_train=2, n_test_good=1,
                      n_test_anomalous=2, size=48)
    frame = write_photo_manifest(str(tmp_path / "a"), str(tmp_path / "a.parquet"), photos)
    counts = frame.groupby(["category", "role", "label"]).size().to_dict()
    for category in ("cat", "brick"):
        assert counts[(category, "reference", 0)] == 2
        assert counts[(category, "query", 0)] == 1
        assert counts[(category, "query", 1)] == 2 * len(DEFECT_KINDS)
    assert set(frame["dataset"]) == {DATASET}
    assert set(frame["defect_type"].dropna()) == set(DEFECT_KINDS)
    # every anomalous query has its mask: a square of the defect, the image's size
    anomalous = frame[frame["label"] == 1]
    assert anomalous["mask_uri"].notna().all() and frame[frame["label"] == 0]["mask_uri"].isna().all()
    for _, row in anomalous.iterrows():
        mask = np.asarray(Image.open(row["mask_uri"]))
        assert mask.shape == (48, 48) and 0 < (mask > 0).sum() < 48 * 48 / 4
    again = write_photo_manifest(str(tmp_path / "b"), str(tmp_path / "b.parquet"), photos)
    first, second = (sorted(f["image_uri"]) for f in (frame, again))
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]
    only = PhotoSet(categories=("cat",), n_train=1, n_test_good=1, n_test_anomalous=1, size=48,
                    defects=("rotated",))
    one = write_photo_manifest(str(tmp_path / "c"), str(tmp_path / "c.parquet"), only)
    assert set(one["defect_type"].dropna()) == {"rotated"}
    # Calibration images come on top; every other image stays as it was.
    calibrated = replace(photos, n_calibration=3)
    more = write_photo_manifest(str(tmp_path / "d"), str(tmp_path / "d.parquet"), calibrated)
    held = more[more["role"] == "calibration"]
    assert held.groupby("category").size().to_dict() == {"cat": 3, "brick": 3}
    assert (held["label"] == 0).all()
    rest = sorted(more.loc[more["role"] != "calibration", "image_uri"])
    assert [open(p, "rb").read() for p in rest] == [open(p, "rb").read() for p in first]


def test_structural_defects_change_only_their_region():
    """Each structural defect rewrites its square and nothing else; none is a no-op."""
    import numpy as np

    from tests.model.scorers.photos import STRUCTURAL, ProductLine

    line = ProductLine(product="brick", size=64, paste=0.2)
    for kind in STRUCTURAL:
        base = line.normal(np.random.default_rng(7))
        img, (top, left, side) = line.defective(np.random.default_rng(7), kind)
        diff = np.abs(np.asarray(img, float) - np.asarray(base, float)).sum(-1)
        inside = np.zeros_like(diff, bool)
        inside[top:top + side, left:left + side] = True
        assert diff[~inside].max() == 0, kind
        assert diff[inside].mean() > 1.0, kind
    with pytest.raises(ValueError, match="unknown defect kind"):
        line.defective(np.random.default_rng(0), "melted")


def test_quality_marks_the_scorers_on_random_weights():
    import pandas as pd

    from bench import quality
    from pipeline.model.backbone import tiny_spec
    from pipeline.model.scorers.registry import scorer_names
    from pipeline.model.scorers.suite import SuiteSpec

    suite = SuiteSpec.of(scorer_names(), tiny_spec(), None, cnn_backbone="mobilenet_v2",
                         cnn_weights="/nowhere/" + quality.MOBILENET_FILE,
                         vit_backbone="vit_small_patch14_dinov2", vit_weights="random:0",
                         vit_image_size=112)
    # CoOp reads the random CLIP; RegAD has no checkpoint, so no trained network at all
    assert quality.random_scorers(suite) == {"inctrl", "winclip", "anomalydino", "coop",
                                             "regad"}
    notes = quality.weights_notes(suite)
    assert all("not a quality figure" in notes[s] for s in ("inctrl", "winclip", "anomalydino"))
    assert "not a quality figure" not in notes["patchcore"]
    table = pd.DataFrame([{"dataset": "d", "k": 2, "inctrl_auroc_mean": 0.5,
                           "inctrl_auroc_std": 0.1, "inctrl_auprc_mean": 0.6,
                           "inctrl_auprc_std": 0.0, "patchcore_auroc_mean": 0.9,
                           "patchcore_auroc_std": 0.0, "patchcore_auprc_mean": 0.8,
                           "patchcore_auprc_std": 0.0}])
    text = quality.render(table, ("inctrl", "patchcore"), {"inctrl"})
    assert "| dataset | k | inctrl † | patchcore |" in text
    assert "| d | 2 | 0.500 ± 0.100 | 0.900 ± 0.000 |" in text
    assert text.count(quality.RANDOM_NOTE) == 2  # under the AUROC and the AUPRC table


def _regad_checkpoint(path, init_weights: str) -> str:
    """A small untrained RegAD network (identity transformers) saved as a checkpoint."""
    from pipeline.model.scorers.regad import RegadModel, RegadSpec, save_regad

    save_regad(RegadModel(RegadSpec("resnet18", init_weights, image_size=32)), str(path))
    return str(path)


def test_quality_passes_the_trained_scorers_checkpoints_to_the_job(tmp_path, monkeypatch,
                                                                   capsys):
    """--regad-checkpoint and --coop-checkpoint reach the suite and the job's config; a
    trained scorer without its checkpoint is a usage error naming the train command."""
    import torch
    import torchvision

    from bench import quality

    # RegAD's CNN started from a weights file (not random): a quality figure
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    regad = _regad_checkpoint(tmp_path / "regad.safetensors", str(weights))
    coop = str(tmp_path / "coop.safetensors")  # read only when the job loads CoOp
    args = quality.parse_args(["--scorer", "regad,coop,patchcore", "--regad-checkpoint", regad,
                               "--coop-checkpoint", coop, *SMALL_MODELS])
    suite = quality.suite_of(args)
    assert suite.setting("regad_checkpoint") == regad
    assert suite.setting("coop_checkpoint") == coop
    assert quality.random_scorers(suite) == {"coop", "patchcore"}  # random CLIP and CNN
    assert "untrained (identity transformers)" in quality.weights_notes(suite)["regad"]

    seen = {}

    def fake_run(config, beam_args):
        seen["suite"] = config.suite
        raise RuntimeError("stop before the job runs")

    monkeypatch.setattr(quality, "run_score", fake_run)
    with pytest.raises(RuntimeError, match="stop before"):
        quality.score_once(args, str(tmp_path / "m.parquet"), str(tmp_path / "out"), 1)
    assert seen["suite"].setting("regad_checkpoint") == regad
    assert seen["suite"].setting("coop_checkpoint") == coop

    # a network whose CNN started from random weights is marked
    random_regad = _regad_checkpoint(tmp_path / "random.safetensors", "random:0")
    marked = quality.suite_of(quality.parse_args(["--scorer", "regad", "--regad-checkpoint",
                                                  random_regad, *SMALL_MODELS]))
    assert quality.random_scorers(marked) == {"regad"}

    # by default every scorer that needs no trained file
    assert set(quality.parse_args(SMALL_MODELS).scorer) == {
        "inctrl", "spade", "padim", "patchcore", "winclip", "anomalydino"}
    capsys.readouterr()
    for scorer in ("regad", "coop"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--scorer", scorer, *SMALL_MODELS])
        err = capsys.readouterr().err
        assert f"--{scorer}-checkpoint" in err and f"train --method {scorer}" in err


def test_quality_demo_set_has_references_for_the_largest_k(tmp_path):
    import pandas as pd

    from bench import quality

    args = quality.parse_args(["--k-list", "1,8", "--demo-test-good", "1",
                               "--demo-test-defect", "1", *SMALL_MODELS])
    frame = pd.read_parquet(quality.demo_manifest(str(tmp_path), args))
    refs = frame[frame["role"] == "reference"].groupby("category").size()
    assert refs.min() == 16 and len(refs) == 5  # 2 × the largest k
    assert quality.MASK_COLUMN not in frame.columns  # image level only


def test_quality_bench_runs_the_job_and_tabulates(tmp_path, capsys):
    from bench import quality

    out = tmp_path / "q.json"
    rc = quality.main(["--sets", "photos", "--k-list", "1", "--seeds", "0,1",
                       "--scorer", "inctrl,patchcore", *SMALL_MODELS, *TINY,
                       "--photo-categories", "cat", "--photo-test-good", "2",
                       "--photo-test-anomalous", "2", "--photo-size", "48", "--batch-size", "4",
                       "--workdir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["random_weights"] == ["inctrl", "patchcore"]
    entry = res["sets"]["photos"]
    kinds = 5  # pasted, rotated, displaced, scaled, missing: 2 of each
    assert entry["shape"] == {"datasets": 1, "categories": 1, "references": 2,
                              "queries": 2 + 2 * kinds, "anomalous": 2 * kinds}
    run = entry["runs"]["1"]
    assert run["queries_scored"] == 12 * 2 * 2  # queries × seeds × scorers
    (row,) = entry["table"]
    assert row["dataset"] == "real_photos" and row["k"] == 1
    assert 0 <= row["inctrl_auroc_mean"] <= 1 and 0 <= row["patchcore_auprc_mean"] <= 1
    defects = entry["defects"]["1"]
    assert {(d["scorer"], d["defect_type"]) for d in defects} == {
        (s, t) for s in ("inctrl", "patchcore")
        for t in ("all", "pasted", "rotated", "displaced", "scaled", "missing")}
    assert all(0 <= d["auroc_mean"] <= 1 and d["categories"] == 1 for d in defects)
    printed = capsys.readouterr().out
    assert "inctrl † | patchcore † |" in printed and quality.RANDOM_NOTE in printed
    assert "image AUROC per defect type" in printed and "patch_knn" not in printed


def test_decisions_bench_counts_every_decision(tmp_path, capsys):
    from bench import decisions

    out = tmp_path / "d.json"
    rc = decisions.main(["--settings", "0.25:3,0.5:1", "--scorer", "patchcore", "--k", "1",
                         "--seeds", "0,1", "--cnn-weights", "random:0",
                         "--photo-categories", "cat", "--photo-train", "2",
                         "--photo-test-good", "3", "--photo-test-anomalous", "1",
                         "--photo-size", "48", "--batch-size", "4", "--workdir",
                         str(tmp_path / "work"), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(s["alpha"], s["calibration"]) for s in res["settings"]] == [(0.25, 3), (0.5, 1)]
    for setting in res["settings"]:
        rows = {r["kind"]: r for r in setting["decisions"]}
        normal = rows["normal"]
        # 3 normal queries × 2 seeds, all decided (3 + 1 pool image, or 1 + 1, reach alpha).
        assert normal["decided"] == 6 and 0 <= normal["flagged"] <= 6
        assert normal["ci_low"] <= normal["rate"] <= normal["ci_high"]
        assert normal["calibration_n"] == f"{setting['calibration'] + 1}–" \
                                          f"{setting['calibration'] + 1}"
        assert rows["all anomalies"]["decided"] == 5 * 2  # one per defect kind, two seeds
        assert {k for k in rows} == {"normal", "all anomalies", "pasted", "rotated",
                                     "displaced", "scaled", "missing"}
    printed = capsys.readouterr().out
    assert "α = 0.25, 3 calibration images per category" in printed
    assert "| patchcore |" in printed and "Recall at the decision" in printed


def test_scorer_cost_bench_times_every_step(tmp_path, capsys):
    from bench import scorer_cost

    out = tmp_path / "c.json"
    rc = scorer_cost.main(["--n", "3", "--k", "1", "--batch-size", "2", "--n-forward", "2",
                           "--repeats", "1", "--passes", "1",
                           "--scorer", "inctrl,patchcore,anomalydino",
                           *SMALL_MODELS, *TINY, "--image-size", "48",
                           "--workdir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["forward_s_per_image"]) == {"clip", "cnn", "dino"}
    assert set(res["scorers_cost"]) == {"inctrl", "patchcore", "anomalydino"}
    assert all(v > 0 for v in res["forward_s_per_image"].values())
    job = res["job"]
    (fixed,) = job["fixed"]
    for name, run, queries in (("fixed", fixed, 1), ("full", job["full"], 3)):
        assert run["reference_forwards"] == 1, name
        assert run["query_forwards"] == queries, name
        assert run["queries_scored"] == 3 * queries, name
        # the bench put the job's prompt embeddings into its cache: no run encodes them
        assert run["prompt_sets_encoded"] == 0 and run["prompt_sets_from_cache"] == 1, name
    assert res["derived"]["fixed_s"] == fixed["seconds"]
    assert "Scorer cost beside the backbone forwards" in capsys.readouterr().out


def test_per_defect_auroc_is_per_category_then_over_seeds():
    """Hand-sized scores: each category's normals against its anomalies of one type; the
    mean over categories per seed; mean and population std over seeds."""
    import pandas as pd

    from bench.quality import per_defect_auroc

    rows = []
    # seed 0: cat separates 'a' perfectly and 'b' not at all; dog separates both
    # seed 1: everything separates
    for seed, cat_b in ((0, 0.0), (1, 9.0)):
        for category, b_score in (("cat", cat_b), ("dog", 9.0)):
            rows += [dict(dataset="d", category=category, label=0, defect_type=None,
                          seed=seed, scorer="s", final_score=v) for v in (1.0, 2.0)]
            rows.append(dict(dataset="d", category=category, label=1, defect_type="a",
                             seed=seed, scorer="s", final_score=5.0))
            rows.append(dict(dataset="d", category=category, label=1, defect_type="b",
                             seed=seed, scorer="s", final_score=b_score))
    table = per_defect_auroc(pd.DataFrame(rows)).set_index("defect_type")
    assert table.loc["a", "auroc_mean"] == 1.0 and table.loc["a", "auroc_std"] == 0.0
    # b: seed 0 → (0 + 1) / 2 = 0.5, seed 1 → 1.0: mean 0.75, population std 0.25
    assert table.loc["b", "auroc_mean"] == pytest.approx(0.75)
    assert table.loc["b", "auroc_std"] == pytest.approx(0.25)
    # all: seed 0 cat → ranks of {5, 0} over {1, 2}: 0.5, dog 1.0 → 0.75; seed 1 → 1.0
    assert table.loc["all", "auroc_mean"] == pytest.approx(0.875)
    assert set(table["categories"]) == {2}


def test_patch_knn_scores_its_references_zero_and_a_pasted_square_higher(tmp_path):
    """The yardstick from the PatchCore paper: a reference scores 0 against itself; a copy
    with a foreign square scores above a clean copy."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from bench.patch_knn import PatchKnn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
    weights = tmp_path / "r18.pth"
    torch.save(model.state_dict(), weights)
    knn = PatchKnn("resnet18", str(weights), image_size=64)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ref = Image.fromarray(base)
    bad = base.copy()
    bad[20:36, 20:36] = 255 - bad[20:36, 20:36]
    clean, pasted = knn.scores([ref], [ref, Image.fromarray(bad)])
    assert clean == pytest.approx(0.0, abs=1e-3) and pasted > 0.1
    with pytest.raises(ValueError, match="no stages known"):
        PatchKnn("vgg11", str(weights))


def test_tower_clock_counts_the_towers_time_inside_each_run_only():
    """bench.runtime's drift-free figure: the tower's share of the job's marginal time is
    (tower seconds of the long run − of the short run) / (wall seconds of the one − the
    other), round by round; the bare tower timed between runs must not count."""
    from types import SimpleNamespace

    from bench.runtime import TowerClock

    now = [0.0]

    def tower(pixels):
        now[0] += 0.1  # every forward costs 0.1 s of the fake clock
        return pixels

    backbone = SimpleNamespace(encode_images=tower)
    clock = TowerClock(clock=lambda: now[0])
    clock.install(backbone)

    def job(forwards: int, wall: float, images: int):
        def run():
            for _ in range(forwards):
                backbone.encode_images(None)
            return images / wall, images / wall
        return run

    short_run = clock.clocked(job(2, 1.0, 5), "bf16@5", 5)  # tower 0.2 s of 1.0 s
    for wall in (2.0, 1.8):  # tower 1.0 s of 2.0 s, then of 1.8 s
        clock.clocked(job(10, wall, 20), "bf16@20", 20)()
        backbone.encode_images(None)  # a bare forward between runs: not the job's
        short_run()
    shares = clock.shares("bf16@20", "bf16@5")
    assert [round(r["share"], 6) for r in shares["rounds"]] == [0.8, 1.0]
    assert [round(r["tower_s"], 6) for r in shares["rounds"]] == [0.8, 0.8]
    assert round(shares["median"], 6) == 0.9
    assert backbone.encode_images(None) is None  # the wrapped tower still returns its result
