"""Import CLI: ``byol-import-official --checkpoint=pretrain_res50x1.pkl --out=DIR``.

Reads an official BYOL release checkpoint without executing anything in it
(:mod:`byol_flax.weights.official`), maps the online encoder, projector, predictor and online
classifier onto this project's modules and writes the export format
(:mod:`byol_flax.export.encoder`: ``encoder/``, ``heads/``, ``encoder_config.json``) with a model
card whose provenance names the file, its sha256, the step and the source. Evaluate it with
``byol-evaluate --source=DIR``; convert it with ``byol-export --source=DIR --format=torch``.
"""

from absl import app, flags

from byol_flax.export import model_card
from byol_flax.export.encoder import export_encoder
from byol_flax.runtime import commands
from byol_flax.runtime.outputs import check_output_dir
from byol_flax.runtime.xla import configure_xla_flags
from byol_flax.weights import official

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The release's .pkl file.")
_OUT = flags.DEFINE_string("out", None, "Export directory to write.")
flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    # Errors are one line (commands.run_command; the reader's messages escape text from the
    # file). --out is checked before the file is read (byol_flax.runtime.outputs).
    check_output_dir(_OUT.value, "export", inputs=[_CHECKPOINT.value])
    pretrained = official.import_official(_CHECKPOINT.value)
    card = model_card.build_model_card(pretrained)
    out = export_encoder(pretrained, _OUT.value, inputs=[_CHECKPOINT.value],
                         write_extra=lambda staging: model_card.write_model_card(staging, card))
    encoder = pretrained.model_config["encoder"]
    print(f"imported {encoder['name']} x{encoder['width_multiplier']} (step "
          f"{pretrained.origin['step']}, sha256 {pretrained.origin['sha256'][:12]}...) with "
          f"{', '.join(pretrained.heads())} to {out}")


def run() -> None:
    """Console entry point."""
    commands.run_command(main, __name__)


if __name__ == "__main__":
    run()
