"""What a run on ``gs://`` costs in Cloud Storage objects and requests, counted by the test
server (tests/gcs_server.py) that every request goes through.

    python benchmarks/gcs_costs.py [--workdir /tmp/byol_gcs_costs]

Two runs of the reliability suite's 20-step digits run (benchmarks/reliability_processes.py)
with workdir and data on the server: one saving a checkpoint every 4 steps (5 checkpoints), one
saving only the last step (1 checkpoint). Their difference, divided by 4, is what one
checkpoint costs: objects written and requests by kind. The workdir lease's own requests (a
heartbeat, a fence) are counted on their own, in this process. Prints markdown tables and a
final JSON line. The sizes are the tiny model's; a checkpoint's object count does not grow with
the model (Orbax's OCDBT packs arrays into a few data files), its bytes do.
"""

import argparse
import collections
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.reliability_processes import Run, entry_point, subprocess_env  # noqa: E402
from tests.gcs_server import GcsServer  # noqa: E402

BIN = Path(sys.executable).parent


def kind(method: str, path: str, query: str) -> str:
    """A request's operation, as Cloud Storage bills it (class A: writes and lists)."""
    if path.startswith("/upload/"):
        return "upload (A)"
    if re.search(r"/o/[^/]+/(compose|copyTo|rewriteTo|moveTo)", path):
        return "copy/compose (A)"
    if method == "DELETE":
        return "delete (free)"
    if re.fullmatch(r"/storage/v1/b/[^/]+/o/?", path) and method == "GET":
        return "list (A)"
    if method in ("GET", "HEAD"):
        return "read (B)" if "alt=media" in query or path.startswith("/download/") \
            else "metadata (B)"
    return f"{method} other"


def count(requests) -> collections.Counter:
    return collections.Counter(kind(r.method, r.path, r.query) for r in requests)


def run_counts(server: GcsServer, bucket, root: Path, name: str, env: dict, *extra: str
               ) -> tuple[collections.Counter, int, float]:
    server.clear_requests()
    started = time.perf_counter()
    run = Run(entry_point("gs://bucket/digits", f"gs://bucket/{name}",
                          f"--config.data.local_cache_dir={root / 'cache'}", *extra,
                          program=[str(BIN / "byol-train")]), env, root / f"{name}.log")
    if run.finish() != 0:
        raise SystemExit(f"{name} failed; see {root / f'{name}.log'}")
    seconds = time.perf_counter() - started
    objects = sum(1 for _ in bucket.list_blobs(prefix=f"{name}/"))
    return count(server.requests), objects, seconds


def lease_counts(server: GcsServer) -> dict[str, dict[str, int]]:
    from byol_flax.checkpointing import lease

    held = lease.WorkdirLease("gs://bucket/lease_costs", stale_after_seconds=600)
    server.clear_requests()
    held.acquire()
    acquired = count(server.requests)
    server.clear_requests()
    held._version = held._store.swap(held._version, held._record())  # noqa: SLF001  (one beat)
    beat = count(server.requests)
    server.clear_requests()
    lease.fence()
    fenced = count(server.requests)
    held.release()
    return {"acquire": dict(acquired), "heartbeat": dict(beat), "fence": dict(fenced)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/byol_gcs_costs",
                        help="local scratch directory (the digits, logs, compilation cache)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    from byol_flax.data.convert import digits

    digits.main(["--out", str(root / "digits"), "--holdout-count", "100", "--no-progress"])
    with GcsServer() as server:
        os.environ["STORAGE_EMULATOR_HOST"] = server.emulator_host
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        bucket = storage.Client(project="costs", credentials=AnonymousCredentials()).bucket(
            "bucket")
        for name in os.listdir(root / "digits"):
            bucket.blob(f"digits/{name}").upload_from_filename(str(root / "digits" / name))
        env = {**subprocess_env(root / "jax_cache"), "STORAGE_EMULATOR_HOST": server.emulator_host}
        run_counts(server, bucket, root, "warm_up", env)  # fills the compilation cache
        every4, objects4, seconds4 = run_counts(server, bucket, root, "every4", env)
        last, objects1, seconds1 = run_counts(server, bucket, root, "last_only", env,
                                              "--config.checkpoint.every_steps=1000")
        per_checkpoint = {k: (every4[k] - last[k]) / 4 for k in sorted(every4 | last)}
        checkpoint_objects = sum(1 for _ in bucket.list_blobs(prefix="every4/checkpoints/20/"))
        leases = lease_counts(server)
    rows = ["| requests | run, 5 checkpoints | run, 1 checkpoint | one checkpoint |",
            "|---|---|---|---|"]
    rows += [f"| {k} | {every4[k]} | {last[k]} | {per_checkpoint[k]:.1f} |"
             for k in sorted(per_checkpoint)]
    rows += [f"| objects in the workdir | {objects4} | {objects1} | "
             f"{checkpoint_objects} (one step's directory) |",
             f"| wall time | {seconds4:.1f} s | {seconds1:.1f} s | |"]
    print("\n".join(rows))
    print("\n| lease | requests |\n|---|---|")
    for name, counted in leases.items():
        print(f"| {name} | {', '.join(f'{v} {k}' for k, v in sorted(counted.items()))} |")
    print(json.dumps({"per_checkpoint": per_checkpoint, "checkpoint_objects": checkpoint_objects,
                      "run_5_checkpoints": dict(every4), "run_1_checkpoint": dict(last),
                      "lease": leases}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
