"""Held-out top-1 of the online classifier trained during pre-training (official implementation).

The classifier (:func:`byol_flax.train_state.create_train_state`) is a linear layer on the
stop-gradient representation; here it is applied to the encoder's representation of the test
split (during pre-training ``monitor.eval_split``; evaluation view, BatchNorm in inference
mode), the curve the official code reports while BYOL trains. Only a training state carries the
classifier: exports and checkpointed encoders do not.
"""

from typing import Any

import jax
from flax import nnx

from byol_flax.evaluation.base import Context, protocol, result
from byol_flax.export.encoder import SourceError


class _EncoderWithHead(nnx.Module):
    """Images -> logits of the online classifier on the encoder's representation."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module):
        self.encoder = encoder
        self.head = head

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.encoder(images))


@protocol("online_classifier", reads_monitor_data=False)  # its classes are the training labels
def run_online_classifier(ctx: Context) -> dict[str, Any]:
    """Accuracies of the online classifier on the test split; nothing is fitted."""
    classifier = ctx.pretrained.classifier
    if classifier is None:
        raise SourceError(f"{ctx.pretrained.origin}: no online classifier (only a training "
                          "state has one: use it as a monitor, config.monitor.evaluators)")
    model = _EncoderWithHead(ctx.pretrained.encoder, classifier)
    return result(ctx, "online_classifier", [], {}, ctx.classifier_scores(model, ctx.test))
