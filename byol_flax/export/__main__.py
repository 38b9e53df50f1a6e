"""Export CLI: ``python -m byol_flax.export --workdir=PRETRAINING_WORKDIR --out=DIR``.

Writes the online encoder alone (Orbax), ``encoder_config.json`` (with a sha256 per array) and
the model card (``MODEL_CARD.md``, ``model_card.json``). Evaluation results are added to the card
here with ``--results=EVAL_WORKDIR,...`` or later by ``byol-add-results``. ``--out`` must be
new, empty or an earlier export (:mod:`byol_flax.runtime.outputs`).
Reload with ``byol_flax.export.encoder.load_encoder(DIR)``.

``--source=`` instead of ``--workdir=`` exports anything the evaluation's ``--source`` names
(an export directory, e.g. an imported official checkpoint, or a pre-training workdir).
``--format=torch`` writes ``encoder.safetensors`` and the model card instead: a ResNet under
torchvision's keys (:mod:`byol_flax.export.torch_format`; reload with
``byol_flax.export.torch_resnet.load_torch_encoder(DIR)``), a Vision Transformer under timm's
``VisionTransformer`` keys (:mod:`byol_flax.export.timm_vit`; reload with
``timm.models.vision_transformer.VisionTransformer(**arch)`` and
``load_state_dict(safetensors.torch.load_file(FILE), strict=True)``, or
``byol_flax.export.torch_vit.build_timm_model(DIR)``).
"""

from absl import app, flags

from byol_flax.export import model_card
from byol_flax.runtime import commands
from byol_flax.runtime.xla import configure_xla_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Pre-training workdir (holds checkpoints/).")
_SOURCE = flags.DEFINE_string("source", None, "Instead of --workdir: an export directory or "
                              "anything else byol_flax.evaluation's --source accepts.")
_FORMAT = flags.DEFINE_enum("format", "byol_flax", ["byol_flax", "torch"],
                            "byol_flax: Orbax arrays + encoder_config.json (load_encoder); torch: "
                            "encoder.safetensors with torchvision's ResNet keys "
                            "(torch_resnet.load_torch_encoder) or, for a ViT, timm's "
                            "VisionTransformer keys (timm VisionTransformer(**arch) + "
                            "load_state_dict(strict=True); torch_vit.build_timm_model).")
_OUT = flags.DEFINE_string("out", None, "Export directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_RESULTS = flags.DEFINE_list("results", [], "Evaluation workdirs whose results.json to record.")
_INTENDED = flags.DEFINE_string("intended_use", "", "Model card: intended uses.")
_OUT_OF_SCOPE = flags.DEFINE_string("out_of_scope_use", "", "Model card: disallowed uses.")
_FAILURES = flags.DEFINE_string("known_failures", "", "Model card: known failure domains.")
flags.mark_flags_as_required(["out"])
flags.mark_flags_as_mutual_exclusive(["workdir", "source"], required=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    # Errors (a bad source, an --out that is not ours) are one line (commands.run_command); a
    # failed export leaves the previous one intact.
    out = model_card.export_with_model_card(
        _WORKDIR.value, _OUT.value, source=_SOURCE.value, step=_STEP.value,
        export_format=_FORMAT.value, results=_RESULTS.value, intended_use=_INTENDED.value,
        out_of_scope_use=_OUT_OF_SCOPE.value, known_failures=_FAILURES.value)
    written = sorted(p.name for p in out.iterdir())
    print(f"exported to {out}: {', '.join(written)}")


def run() -> None:
    """Console entry point."""
    commands.run_command(main, __name__)


if __name__ == "__main__":
    run()
