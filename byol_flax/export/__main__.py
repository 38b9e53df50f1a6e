"""Export CLI: ``python -m byol_flax.export --workdir=PRETRAINING_WORKDIR --out=DIR``.

Writes the online encoder alone (Orbax), ``encoder_config.json`` and the model card
(``MODEL_CARD.md``, ``model_card.json``). Evaluation results are added to the card by
``python -m byol_flax.evaluation --source=DIR`` or here with ``--results=EVAL_WORKDIR,...``.
Reload with ``byol_flax.export.encoder.load_encoder(DIR)``.
"""

import sys

from absl import app, flags

from byol_flax.export import model_card
from byol_flax.export.encoder import SourceError
from byol_flax.runtime import console
from byol_flax.runtime.xla import configure_xla_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Pre-training workdir (holds checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Export directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RESULTS = flags.DEFINE_list("results", [], "Evaluation workdirs whose results.json to record.")
_INTENDED = flags.DEFINE_string("intended_use", "", "Model card: intended uses.")
_OUT_OF_SCOPE = flags.DEFINE_string("out_of_scope_use", "", "Model card: disallowed uses.")
_FAILURES = flags.DEFINE_string("known_failures", "", "Model card: known failure domains.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    try:
        out = model_card.export_with_model_card(
            _WORKDIR.value, _OUT.value, step=_STEP.value, results=_RESULTS.value,
            intended_use=_INTENDED.value, out_of_scope_use=_OUT_OF_SCOPE.value,
            known_failures=_FAILURES.value)
    except (SourceError, OSError) as error:  # a failed export leaves the previous one intact
        sys.exit(f"error: {type(error).__name__}: {error}")
    print(f"exported to {out}: {model_card.CARD_MARKDOWN}, {model_card.CARD_JSON}")


def run() -> None:
    """Console entry point."""
    console.run_command(main, __name__)


if __name__ == "__main__":
    run()
