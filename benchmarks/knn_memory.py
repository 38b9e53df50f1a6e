"""Peak memory and time of kNN against growing memory banks: the streamed bank
(``byol_flax.evaluation.knn``, chunks of ``knn.bank_chunk`` rows with a running top-k) against
the whole-bank kNN it replaced, each point in a fresh subprocess.

    python benchmarks/knn_memory.py --sizes 50000 200000 800000 --dim 2048 --queries 1024

The bank is a float32 memory map on disk (``--dir``), written chunk by chunk, so building it
costs no memory; the whole-bank kNN runs only up to ``--whole-max`` rows. Each point's load is
watched (``benchmarks/quiet.py``: its times count only from a quiet machine); prints the points
and the result JSON, which ``--json-out`` also writes for ``benchmarks/report.py``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/knn_memory.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet

WRITE_ROWS = 16384


def write_bank(path: str, rows: int, dim: int, seed: int = 0) -> None:
    bank = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, WRITE_ROWS):
        stop = min(start + WRITE_ROWS, rows)
        bank[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    bank.flush()


def anonymous_mib() -> float:
    """Resident anonymous memory (heap, arrays, device buffers on the CPU): RSS without the
    memory map's file pages, which the kernel may drop at any time (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class AnonymousPeak:
    """Samples :func:`anonymous_mib` every 5 ms in a thread; ``peak`` is the largest seen."""

    def __init__(self):
        self.peak, self._stop = anonymous_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, anonymous_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, anonymous_mib())


def measure(path: str, mode: str, queries: int, bank_chunk: int) -> dict:
    """One point, in this (fresh) process: peak RSS is the process's own high-water mark (the
    memory map's resident file pages included); peak anonymous memory is sampled."""
    import jax.numpy as jnp  # noqa: PLC0415 - after the parent chose the process

    from byol_flax.evaluation import knn  # noqa: PLC0415

    bank = np.load(path, mmap_mode="r")
    labels = np.arange(len(bank), dtype=np.int32) % 1000
    rng = np.random.default_rng(1)
    query = rng.standard_normal((queries, bank.shape[1]), dtype=np.float32)
    query_labels = rng.integers(0, 1000, queries)
    sampler = AnonymousPeak()
    start = time.perf_counter()
    if mode == "streamed":
        accuracy = knn.knn_accuracy((bank, labels), (query, query_labels), ks=(20, 200),
                                    temperature=0.07, num_classes=1000, bank_chunk=bank_chunk)
    else:  # the previous knn_accuracy: the bank normalised and placed on the device whole
        unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        train_x, eval_x = jnp.asarray(unit(np.asarray(bank))), jnp.asarray(unit(query))
        accuracy = {k: float(np.mean(np.asarray(_whole_bank(train_x, jnp.asarray(labels),
                                                            eval_x, k)) == query_labels))
                    for k in (20, 200)}
    seconds = time.perf_counter() - start
    peak_anonymous = sampler.stop()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024,
            "peak_anonymous_mib": peak_anonymous, "accuracy": accuracy}


def _whole_bank(train_features, train_labels, queries, k, chunk=1024):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    @jax.jit
    def predict(q):
        sims = q @ train_features.T
        top_sims, top_index = jax.lax.top_k(sims, k)
        weights = jnp.exp(top_sims / 0.07)
        votes = jax.nn.one_hot(train_labels[top_index], 1000) * weights[..., None]
        return jnp.argmax(votes.sum(axis=1), axis=-1)

    return jnp.concatenate([predict(queries[i:i + chunk]) for i in range(0, len(queries), chunk)])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 800_000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--bank-chunk", type=int, default=16384)
    parser.add_argument("--whole-max", type=int, default=200_000)
    parser.add_argument("--dir", default="")
    parser.add_argument("--json-out", help="also write the result JSON here")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)  # (path, mode): a child
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure(args.point[0], args.point[1], args.queries, args.bank_chunk)))
        return
    from byol_flax.runtime.xla import configure_xla_flags

    configure_xla_flags()  # the evaluation's own flags, in XLA_FLAGS for every point's process
    points, loads = [], []
    with tempfile.TemporaryDirectory(dir=args.dir or None) as directory:
        for size in args.sizes:
            path = os.path.join(directory, f"bank{size}.npy")
            write_bank(path, size, args.dim)
            modes = ["streamed"] + (["whole bank"] if size <= args.whole_max else [])
            for mode in modes:
                with quiet.watch(loads):
                    out = subprocess.run(
                        [sys.executable, __file__, "--point", path, mode, "--queries",
                         str(args.queries), "--bank-chunk", str(args.bank_chunk)],
                        capture_output=True, text=True, check=True)
                point = json.loads(out.stdout.strip().splitlines()[-1])
                points.append({"rows": size, "mode": mode,
                               "chunk_rows": args.bank_chunk if mode == "streamed" else size,
                               "bank_gb": round(size * args.dim * 4 / 1e9, 2),
                               "peak_rss_mib": round(point["peak_rss_mib"]),
                               "peak_anonymous_mib": round(point["peak_anonymous_mib"]),
                               "seconds": round(point["seconds"], 2), "load": loads[-1].as_dict()})
                print(f"{size} {mode}: {point}", file=sys.stderr, flush=True)
            os.remove(path)
    result = {"benchmark": "knn_memory", **quiet.provenance(), "dim": args.dim,
              "queries": args.queries, "points": points, "load": quiet.verdict(loads)}
    quiet.emit(result, args.json_out)
    return result

if __name__ == "__main__":
    main()
