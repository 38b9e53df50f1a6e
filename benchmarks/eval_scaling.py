"""Linear evaluation at the cost of one pass: the LR grid against one LR, and a SIGTERM'd run.

    python benchmarks/eval_scaling.py [--workdir /tmp/byol_eval_scaling] [--json-out F]

On the digits (a smoke pre-training of ``digits_cpu`` first), with the paper's augmentation
(``linear.augment=spatial``: random resized crop + flip, Appendix D.1), through the real command
(``python -m byol_flax.evaluation``), one run after the other:

1. the 5-LR grid of ``eval_digits:linear`` against the same command with one LR (the grid's
   selected one): wall seconds, their ratio (target: at most 1.6), and the test metrics of both
   (equal: the selected head is the 1-LR run); the wall-time ratio only from a quiet machine
   (``benchmarks/quiet.py``; else the reason), the CPU-time ratio always;
2. the grid uninterrupted, then the grid stopped by SIGTERM at half the uninterrupted run's
   time and re-run: the step it stopped at, the re-run's seconds against the uninterrupted
   run's (target: under 75%), and the test metrics (equal).

Prints the result JSON; ``--json-out`` also writes it for ``benchmarks/report.py`` (the docs'
table, with the date, host and load beside it).
"""

import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/eval_scaling.py`: import benchmarks.*
    sys.path.insert(0, str(REPO))

from benchmarks import quiet  # noqa: E402


def evaluate(data: Path, source: Path, workdir: Path, *extra: str, fresh: bool = True
             ) -> tuple[subprocess.Popen, float]:
    """Starts the evaluation command (on an emptied ``workdir`` unless ``fresh`` is False: the
    same command again, which resumes)."""
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "byol_flax.evaluation",
               f"--config=eval_digits:linear,data={data}", f"--source={source}",
               f"--workdir={workdir}", "--config.linear.augment=spatial", *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True), time.perf_counter()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def finish(run: tuple[subprocess.Popen, float], workdir: Path | None = None) -> dict[str, Any]:
    """Waits for the command: exit status, wall and CPU seconds (the CPU time of the finished
    child: comparable on a loaded machine, where wall time is not), its test metrics."""
    process, started = run
    cpu_before = _children_cpu()
    out, err = process.communicate()
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    results = workdir / "results.json" if workdir else None
    test = json.loads(results.read_text())["test"] if results and results.exists() else None
    return {"exit": process.returncode, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "test": test,
            "last_line": (err.strip().splitlines() or [""])[-1][:300]}


def prepare(root: Path) -> tuple[Path, Path]:
    data, pretrained = root / "data", root / "pretrained"
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "byol_flax.data.convert.digits", "--out",
                        str(data), "--holdout-count", "150", "--no-progress"], check=True,
                       cwd=REPO)
    subprocess.run([sys.executable, "-m", "byol_flax.main",
                    f"--config={REPO / 'byol_flax' / 'configs' / 'digits_cpu.py'}:data={data},"
                    "smoke=True", f"--workdir={pretrained}"], check=True, cwd=REPO,
                   capture_output=True)
    return data, pretrained


def _wall_ratio(numerator: float, denominator: float, loads: list[quiet.Load]
                ) -> dict[str, Any]:
    """A ratio of wall times, only from a quiet machine (benchmarks/quiet.py)."""
    load = quiet.verdict(loads)
    return {"ratio": round(numerator / denominator, 2) if load["quiet"] else None,
            "ratio_withheld": load["reason"], "load": load}


def grid_against_one(data: Path, pretrained: Path, root: Path) -> dict[str, Any]:
    loads: list[quiet.Load] = []
    with quiet.watch(loads):
        grid = finish(evaluate(data, pretrained, root / "grid"), root / "grid")
    chosen = json.loads((root / "grid" / "results.json").read_text())["selected"]
    with quiet.watch(loads):
        one = finish(evaluate(data, pretrained, root / "one",
                              f"--config.linear.learning_rates=({chosen['learning_rate']},)"),
                     root / "one")
    return {"grid": grid, "one_lr": one, "selected": chosen,
            **_wall_ratio(grid["seconds"], one["seconds"], loads),
            "cpu_ratio": round(grid["cpu_seconds"] / one["cpu_seconds"], 2)}


def stopped_and_resumed(data: Path, pretrained: Path, root: Path) -> dict[str, Any]:
    loads: list[quiet.Load] = []
    with quiet.watch(loads):
        uninterrupted = finish(evaluate(data, pretrained, root / "uninterrupted"),
                               root / "uninterrupted")
    workdir = root / "stopped"
    process, started = evaluate(data, pretrained, workdir)
    time.sleep(uninterrupted["seconds"] / 2)
    process.send_signal(signal.SIGTERM)
    stopped = finish((process, started))
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").rglob("*") if p.name.isdigit())
    with quiet.watch(loads):
        resumed = finish(evaluate(data, pretrained, workdir, fresh=False), workdir)
    share = _wall_ratio(resumed["seconds"], uninterrupted["seconds"], loads)
    return {"uninterrupted": uninterrupted, "stopped": stopped,
            "stopped_at_step": saved[-1] if saved else None, "resumed": resumed,
            "resumed_share": share["ratio"], "resumed_share_withheld": share["ratio_withheld"],
            "load": share["load"],
            "resumed_cpu_share": round(resumed["cpu_seconds"] / uninterrupted["cpu_seconds"], 2),
            "same_test_metrics": resumed["test"] == uninterrupted["test"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/byol_eval_scaling")
    parser.add_argument("--json-out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    root = Path(args.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    data, pretrained = prepare(root)
    results = {"benchmark": "eval_scaling", **quiet.provenance(),
               "grid_against_one": grid_against_one(data, pretrained, root),
               "sigterm": stopped_and_resumed(data, pretrained, root)}
    grid, stop = results["grid_against_one"], results["sigterm"]
    results["targets"] = {
        "grid_at_most_1_6x_one_lr": grid["ratio"] is not None and grid["ratio"] <= 1.6,
        "grid_selects_what_one_lr_reports": grid["grid"]["test"] == grid["one_lr"]["test"],
        "resumed_same_test_metrics": stop["same_test_metrics"],
        "resumed_under_75_percent": (stop["resumed_share"] is not None
                                     and stop["resumed_share"] < 0.75),
    }
    quiet.emit(results, args.json_out)
    return 0 if all(results["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
