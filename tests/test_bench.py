"""The benchmarks still run, and what they count is what the job did (not timed).

The GPU benchmark runs on a lent GPU machine with minutes to spare, so a crash there costs
a whole measurement; here it runs its whole path on the CPU with the tiny backbone, under
bf16 autocast (the GPU default) and with the job's decode thread pool. The figures are not
checked, only that every stage ran and that the job's counters add up.
"""
from __future__ import annotations

import json

import pytest

from bench import gpu, throughput

TINY = ["--backbone", "InCTRL-Tiny-ViT-TESTONLY", "--pretrained", "random:0"]


@pytest.fixture(scope="module")
def gpu_result(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-bench")
    out = work / "gpu.json"
    rc = gpu.main(["--device", "cpu", "--precision", "bf16", *TINY, "--batch-size", "8",
                   "--n-forward", "16", "--stage-n", "16", "--distinct", "12", "--e2e-n", "20",
                   "--image-size", "48", "--decode-procs", "2", "--decode-threads", "2",
                   "--workdir", str(work), "--json", str(out)])
    assert rc == 0
    with open(out) as f:
        return json.load(f)


def test_gpu_bench_runs_every_stage(gpu_result, capsys):
    res = gpu_result
    assert res["precision"] == "bf16" and res["decode_threads"] == 2 and "skipped" not in res
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
