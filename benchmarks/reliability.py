"""Reliability suite: faults injected into the real entry point, with figures.

    python benchmarks/reliability.py [--trials 20] [--workdir /tmp/byol_reliability] [--quick]

Runs ``python -m byol_flax.main`` on the bundled digits with a tiny model (20 steps, a checkpoint
every 4) as separate processes and reports, as tables and a final JSON line:

1. random ``kill -9`` (1-3 per trial, during a step, during an asynchronous checkpoint save or
   during a restore), then resumed to the end: share of trials whose final state (parameters,
   target, optimizer state, step, RNG, data position, counters) is bitwise equal to an
   uninterrupted run; unrestorable checkpoints; steps redone per kill;
2. SIGTERM: seconds from the signal to a committed checkpoint and a clean exit; steps lost;
3. damaged checkpoints (stale temporary directory, empty step directory, truncated or bit-flipped
   array file in the newest step, every step damaged): where the run resumed from;
4. damaged data (missing, empty, truncated, bit-flipped shard; a record that is not an image):
   the message, and skip-and-count determinism across a resume;
5. bad configs: the exact message the user sees;
6. a NaN injected into the batch of step k: the step named, no checkpoint of a NaN state;
7. resumes under change and the other ways a long run breaks: other worker counts
   (0 -> 2 -> 1, 2 -> 4) and process counts (2 processes with a damaged newest step, then 1),
   changed config keys (refused, then allowed and recorded), a second run on a live workdir,
   SIGTERM and failures with monitors on, single-bit flips under export's verified read and a
   failed re-export, Grain workers after kill -9, a full disk during a save (tmpfs; needs root),
   the keep period, gs:// staging and bad input to data_prep (benchmarks/reliability_data_prep.py).

``--quick`` (what the test suite runs): one trial with one kill, one case of each kind 2-5 and
the in-process cases of 7 (the entry-point cases of 7 are tests in tests/test_train_driver.py),
about 3 minutes on two CPU cores (each process spends ~10 s importing TensorFlow via CLU).
``--only-changes``: the reference, SIGTERM and section 7.

This file runs the suite and writes the report; the cases live beside it:
``reliability_processes.py`` (starting, following and killing the entry point, reading its
checkpoints: the tests import these helpers too), ``reliability_faults.py`` (sections 1-6) and
``reliability_changes.py`` (section 7, with ``reliability_data_prep.py``).
"""

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/reliability.py`: import benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reliability_changes import change_results, change_targets
from benchmarks.reliability_faults import (
    bad_config_cases,
    checkpoint_damage_cases,
    data_damage_cases,
    kill_trial,
    nan_case,
    sigterm_case,
)
from benchmarks.reliability_processes import EVERY, Suite


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "/") for c in columns)
                     + " |")
    return "\n".join(lines)


def run_suite(root: Path, *, trials: int, quick: bool, seed: int = 0,
              only_changes: bool = False) -> dict[str, Any]:
    from byol_flax.studies.runner import prepare_data  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    from etils import epath  # noqa: PLC0415

    suite = Suite(root, prepare_data(epath.Path(root)), quick)
    started = time.perf_counter()
    reference = suite.reference_run()
    results: dict[str, Any] = {"reference": reference}
    trials_out = [kill_trial(suite, seed * 1000 + t)
                  for t in range(0 if only_changes else trials)]
    kills = [k for t in trials_out for k in t["kills"]]
    redone = [k["steps_redone"] for k in kills if "steps_redone" in k]
    results["kill9"] = {
        "trials": len(trials_out), "kills": len(kills),
        "kills_by_mode": {m: sum(k["mode"] == m for k in kills) for m in ("step", "save",
                                                                        "restore")},
        "bitwise_equal_share": sum(t["bitwise_equal"] for t in trials_out) / max(len(trials_out),
                                                                                  1),
        "unrestorable_checkpoints": sum(t["unrestorable"] for t in trials_out),
        "steps_redone_mean": float(np.mean(redone)) if redone else 0.0,
        "steps_redone_max": max(redone, default=0), "save_interval": EVERY,
        "details": trials_out}
    sigterm, stopped = sigterm_case(suite)
    results["sigterm"] = sigterm
    results["targets"] = {}
    if not only_changes:
        results["damaged_checkpoints"] = checkpoint_damage_cases(suite, stopped)
        results["damaged_data"] = data_damage_cases(suite)
        results["bad_configs"] = bad_config_cases(suite)
        # The NaN run compiles its own (float-input) program: ~1 min, not in the quick subset.
        results["nan"] = None if quick else nan_case(suite, bad_step=7)
        results["targets"] = {
            "kill9_bitwise_equal_share_is_1": results["kill9"]["bitwise_equal_share"] == 1.0,
            "no_unrestorable_checkpoint": results["kill9"]["unrestorable_checkpoints"] == 0,
            # Asynchronous saves: Orbax keeps at most one save in flight (the next save waits
            # for it), so a kill just before save k commits goes back to save k - 1: 2 intervals.
            "steps_redone_within_two_save_intervals":
                results["kill9"]["steps_redone_max"] <= 2 * EVERY,
            "sigterm_no_step_lost": sigterm["steps_lost"] == 0 and sigterm["exit"] == 0,
            "damaged_checkpoints_handled": all(
                (c["exit"] == 0 and c["bitwise_equal"]) or (c["exit"] != 0 and "damaged" in
                                                             c["message"])
                for c in results["damaged_checkpoints"]),
            "damaged_data_named_or_counted": all(
                c["names_file"] or ("skipped" in c["message"]
                                    and "max_skipped_records" in c["message"])
                or (c["exit"] == 0 and c.get("skipped_records", 0) > 0
                    and c.get("skipped_records") == c.get("skipped_after_kill_and_resume"))
                for c in results["damaged_data"]),
            "bad_configs_named": all(c["as_expected"] for c in results["bad_configs"]),
        }
        if results["nan"] is not None:
            results["targets"]["nan_named_and_not_saved"] = (
                results["nan"]["step_named"] == 7
                and not results["nan"]["checkpoint_at_or_after_nan"]
                and results["nan"]["saved_checkpoints_finite"])
    results["changes"] = change_results(suite, stopped)
    results["targets"] |= change_targets(results["changes"])
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def report(results: dict[str, Any]) -> str:
    k = results["kill9"]
    c = results["changes"]
    parts = [
        "## kill -9", table([{**{key: k[key] for key in (
            "trials", "kills", "kills_by_mode", "bitwise_equal_share", "unrestorable_checkpoints",
            "steps_redone_mean", "steps_redone_max", "save_interval")}}],
            ["trials", "kills", "kills_by_mode", "bitwise_equal_share",
             "unrestorable_checkpoints", "steps_redone_mean", "steps_redone_max",
             "save_interval"]),
        "## SIGTERM", table([results["sigterm"]], list(results["sigterm"])),
    ]
    if "damaged_checkpoints" in results:
        parts += [
            "## Damaged checkpoints", table(results["damaged_checkpoints"],
                                            ["damage", "exit", "newest_before", "resumed_from",
                                             "bitwise_equal", "message"]),
            "## Damaged data", table(results["damaged_data"],
                                     ["damage", "exit", "names_file", "message",
                                      "skipped_records", "skipped_after_kill_and_resume"]),
            "## Bad configs", table(results["bad_configs"], ["case", "flags", "exit", "message"]),
            "## NaN injection", table([results["nan"]], list(results["nan"])) if results["nan"]
            else "(not in --quick)",
        ]
    single = lambda key: table([c[key]], list(c[key])) if c.get(key) else "(not in --quick)"
    rows = lambda key: table(c[key], list(dict.fromkeys(
        k for row in c[key] for k in row))) if c.get(key) else "(not in --quick)"
    parts += [
        "## Resume with other worker counts", rows("workers"),
        "## Resume with other process counts (and a damaged step under 2 processes)",
        single("processes"),
        "## Config changes on resume", rows("config_changes"),
        "## Two runs on one workdir", single("shared_workdir"),
        "## Monitors", rows("monitors"),
        "## Evaluate / export read verified checkpoints", rows("verified_reads"),
        "## Grain workers after kill -9", single("orphans"),
        "## Disk full during a save", single("disk_full"),
        "## Retention", single("retention"),
        "## gs:// staging", rows("staging"),
        "## data_prep bad input", rows("data_prep"),
        "## Targets", table([{"target": t, "met": v} for t, v in results["targets"].items()],
                            ["target", "met"]),
    ]
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kill -9 trials")
    parser.add_argument("--workdir", default="/tmp/byol_reliability")
    parser.add_argument("--quick", action="store_true", help="the test suite's subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-changes", action="store_true",
                        help="the reference, SIGTERM and the resume-under-change cases only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trials = min(args.trials, 1) if args.quick else args.trials
    results = run_suite(Path(args.workdir).absolute(), trials=trials, quick=args.quick,
                        seed=args.seed, only_changes=args.only_changes)
    print(report(results))
    summary = {key: value for key, value in results.items() if key != "kill9"}
    summary["kill9"] = {k: v for k, v in results["kill9"].items() if k != "details"}
    print(json.dumps(summary, default=str))
    (Path(args.workdir) / "reliability.json").write_text(json.dumps(results, indent=2,
                                                                    default=str))
    return 0 if all(results["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
