"""Evaluation command: ``python -m byol_flax.evaluation --config=eval_<x>[:ARG]
--source=SOURCE --workdir=DIR`` (``byol-evaluate``).

SOURCE is a pre-training workdir (its latest checkpoint), an export directory
(``python -m byol_flax.export``), ``random:PATH`` (PATH's architecture at random
initialisation: the baseline), or ``pixels`` (raw pixels: the linear-on-pixels baseline). The
protocol is ``config.protocol`` (override with
``--config.protocol=knn`` etc.). Writes ``results.json`` and CLU metrics (TensorBoard) to the
workdir (new, empty or an earlier evaluation's: :mod:`byol_flax.runtime.outputs`), and keeps one
file per finished sweep point under ``sweep/`` so a re-run resumes. Nothing is written into the
source: ``byol-add-results --export=SOURCE --results=DIR`` records the result in an export's
model card.

A bad config key or argument, source, split or workdir is one line naming it (status 1; 2 for a
flag); logs and the traceback go to ``<workdir>/log.txt`` once the workdir is claimed, to
``<tempdir>/byol_flax_logs/byol_flax.evaluation.log`` before (:mod:`byol_flax.runtime.commands`).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from byol_flax.evaluation.runner import evaluate
from byol_flax.runtime import commands
from byol_flax.runtime.xla import configure_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config module.",
                                          lock_config=True)
_SOURCE = flags.DEFINE_string("source", None, "Pre-training workdir, export dir or random:PATH.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results and metrics are written.")
flags.mark_flags_as_required(["config", "source", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    # A SourceError, DataError, ConfigError... is one line naming source/split/key: run_command.
    result = evaluate(_CONFIG.value, _SOURCE.value, _WORKDIR.value, log_to_workdir=True)
    print(json.dumps({"protocol": result["protocol"], "test": result["test"],
                      "selected": result["selected"]}))


def run() -> None:
    """Console entry point."""
    commands.run_command(main, __name__, config_flag="config")


if __name__ == "__main__":
    run()
