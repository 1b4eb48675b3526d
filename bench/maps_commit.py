"""The commit's cost and the record's size against the number of anomaly maps, on a local S3
server (moto's server mode on 127.0.0.1, reached through s3fs as the job reaches S3), with the
S3 requests the commit makes counted by API call.

    python -m bench.maps_commit                       # 100 and 10,000 maps, ~2 minutes
    python -m bench.maps_commit --maps 100,1000,10000 --bundle 50 --repeats 5

For each number of maps N a run writes, as the job's workers do, N maps (a 16-bit map PNG
and an overlay each, small placeholder bytes: the commit never reads them) in place under
its own folder, in bundle attempts of ``--bundle`` maps, one of them failed (its files
are garbage the record must not name), plus one scores part per dataset and a summary.
Then ``commit_run`` (inside the run's lease, as in a job) is timed, from its start to the
end of its publication, and the record's size is read back. Each N is committed
``--repeats`` times on fresh dates; the median is reported. Superseding N maps by a rerun
(deleting the earlier run's folder) is timed apart: it is a deletion, whose cost follows
what is deleted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import command_line, machine, today

BUCKET = "maps-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.maps_commit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--maps", default="100,10000", help="numbers of maps, comma-separated")
    p.add_argument("--datasets", type=int, default=2, help="datasets the maps spread over")
    p.add_argument("--bundle", type=int, default=100, help="maps per bundle attempt")
    p.add_argument("--repeats", type=int, default=3, help="commits per number of maps")
    p.add_argument("--json", default=None, help="also write the figures here")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server():
    """moto's S3 server on 127.0.0.1 and an s3fs file system for it, configured through
    the environment as a user would."""
    from moto.server import ThreadedMotoServer
    import s3fs

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    s3fs.S3FileSystem.clear_instance_cache()
    return server, s3fs.S3FileSystem()


def stage(fs, plan, n_maps: int, datasets: int, bundle: int):
    """What the job's workers leave before the commit: N maps in place (bundle attempts,
    one failed), a scores part per dataset and a summary in staging."""
    from pipeline.core.commit import Staged
    from pipeline.core.layout import MAPS, SUMMARY
    from pipeline.core.schemas import SCORES

    out = plan.output.rstrip("/")
    root = out.split("://", 1)[1]
    files, attempts, parts = {}, [], []
    names = [f"ds{d}" for d in range(datasets)]
    for start in range(0, n_maps, bundle):
        attempt = f"a{start // bundle:06d}"
        for i in range(start, min(start + bundle, n_maps)):
            dataset = names[i % datasets]
            folder = f"{root}/{plan.folder(MAPS, dataset, attempt)}"
            for kind in ("map", "overlay"):
                files[f"{folder}/q{i:07d}.0.inctrl.{kind}.png"] = b"\x89PNG placeholder"
        attempts.extend((MAPS, d, attempt) for d in names)
    failed = f"{root}/{plan.folder(MAPS, names[0], 'failed')}"
    files.update({f"{failed}/q0000000.0.inctrl.{k}.png": b"retried" for k in ("map", "overlay")})
    fs.pipe(files)  # concurrent PUTs, as many workers would
    for dataset in names:
        rel = f"{plan.staging}/{SCORES}/part-{plan.commit_id}-{dataset}.parquet"
        with fs.open(f"{root}/{rel}", "wb") as f:
            pq.write_table(pa.table({"image_id": ["q"], "final_score": [0.5]}), f)
        parts.append((SCORES, dataset, rel))
    summary = f"{plan.staging}/summary/summary.json"
    fs.pipe_file(f"{root}/{summary}", b"{}")
    return Staged(parts=tuple(parts), reports=((SUMMARY, summary),), datasets=tuple(names),
                  attempts=tuple(dict.fromkeys(attempts)))


class RequestCount:
    """S3 requests s3fs makes while counting (per API call name)."""

    def __init__(self) -> None:
        import s3fs

        self.calls: dict[str, int] = {}
        self._counting = False
        original = s3fs.S3FileSystem._call_s3
        counter = self

        async def counted(fs_self, method, *args, **kwargs):
            if counter._counting:
                name = getattr(method, "__name__", str(method))
                counter.calls[name] = counter.calls.get(name, 0) + 1
            return await original(fs_self, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted

    def __enter__(self) -> "RequestCount":
        self.calls, self._counting = {}, True
        return self

    def __exit__(self, *exc) -> None:
        self._counting = False


def commit_once(fs, out: str, date: str, n_maps: int, args, requests: RequestCount) -> dict:
    """One run of ``date`` with ``n_maps`` maps: commit time and record size."""
    from pipeline.core.commit import commit_run
    from pipeline.core.layout import commits_dir, record_name
    from pipeline.core.lease import date_lease

    with date_lease(out, date, f"bench-{n_maps}") as plan:
        staged = stage(fs, plan, n_maps, args.datasets, args.bundle)
        fs.invalidate_cache()
        with requests:
            started = time.perf_counter()
            record = commit_run(plan, staged)
            seconds = time.perf_counter() - started
    size = fs.size(f"{commits_dir(out, date)}/{record_name(record.version)}".split("://", 1)[1])
    return {"seconds": seconds, "record_bytes": size, "version": record.version,
            "attempts": len({a for _, _, a in staged.attempts}),
            "requests": dict(sorted(requests.calls.items()))}


def _calls(calls: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in calls.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.maps.split(",")]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server, fs = start_server()
    requests = RequestCount()
    results = {}
    try:
        for n in counts:
            runs = []
            for r in range(args.repeats):  # a bucket each: moto lists a whole bucket
                fs.mkdir(f"{BUCKET}-{n}-{r}")
                runs.append(commit_once(fs, f"s3://{BUCKET}-{n}-{r}/out", "2024-01-01", n,
                                        args, requests))
            # A rerun of the last date: the same commit, plus deleting the superseded folder.
            rerun = commit_once(fs, f"s3://{BUCKET}-{n}-{args.repeats - 1}/out", "2024-01-01",
                                n, args, requests)
            results[n] = {"commit_s": statistics.median(r["seconds"] for r in runs),
                          "commit_s_all": [round(r["seconds"], 3) for r in runs],
                          "record_bytes": runs[0]["record_bytes"],
                          "attempts": runs[0]["attempts"],
                          "requests": runs[0]["requests"],
                          "rerun_s": rerun["seconds"], "rerun_requests": rerun["requests"]}
    finally:
        server.stop()
    base = results[counts[0]]
    lines = [f"{n} maps ({r['attempts']} bundle attempts): commit {r['commit_s']:.3f} s "
             f"(runs {r['commit_s_all']}; {sum(r['requests'].values())} S3 requests: "
             f"{_calls(r['requests'])}), record {r['record_bytes']} bytes; a rerun "
             f"superseding them {r['rerun_s']:.3f} s ({_calls(r['rerun_requests'])})"
             for n, r in results.items()]
    for n in counts[1:]:
        r = results[n]
        lines.append(f"{n} vs {counts[0]} maps: commit x{r['commit_s'] / base['commit_s']:.2f}, "
                     f"record x{r['record_bytes'] / base['record_bytes']:.2f}")
    print("\n".join(lines))
    print(f"| {today()} | {machine()} | `{command_line()}` | {'; '.join(lines)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
