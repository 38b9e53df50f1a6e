"""Record evaluation results in an export's model card: ``byol-add-results --export=DIR
--results=EVAL_WORKDIR[,EVAL_WORKDIR...]``.

Evaluation (``byol-evaluate --source=DIR --workdir=W``) writes its ``results.json`` to its own
workdir and never into the export it reads; this command is the explicit step that adds those
results to ``DIR``'s ``model_card.json`` and ``MODEL_CARD.md``. It refuses an export directory or
card file that is a symbolic link and replaces the card files without following links
(:func:`byol_flax.export.model_card.add_results_to_card`). ``byol-export --results=...`` records
results when the export is written.
"""

from absl import app, flags

from byol_flax.export import model_card
from byol_flax.runtime import commands

_EXPORT = flags.DEFINE_string("export", None, "Export directory whose model card to update.")
_RESULTS = flags.DEFINE_list("results", None, "Evaluation workdirs (each holds results.json).")
flags.mark_flags_as_required(["export", "results"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    card = model_card.add_results_to_card(_EXPORT.value, _RESULTS.value)
    print(f"{_EXPORT.value}: model card holds {len(card['evaluations'])} evaluation(s)")


def run() -> None:
    """Console entry point."""
    commands.run_command(main, __name__)


if __name__ == "__main__":
    run()
