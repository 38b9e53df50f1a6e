"""How close the PyTorch export comes to our encoder on the digits: exact twin vs torchvision.

Representations of the digits' test split by (i) our JAX encoder (the kNN protocol's feature
path), (ii) :mod:`byol_flax.export.torch_resnet` with ``padding="same"`` (the exact twin) and
(iii) with ``padding="symmetric"``, torchvision's padding: what a stock torchvision ResNet
computes with the same ``encoder.safetensors``. Where torchvision is importable and the
architecture is one of its own (``torchvision_equivalent`` in the file's metadata), (iii) is
``torchvision.models.<name>`` with ``fc = nn.Identity()`` instead; the output says which ran.
Prints a markdown table (max absolute difference from JAX, cosine similarity to JAX, kNN top-1
with the train split as memory, ``eval_digits:knn`` settings) and a final JSON line. Usage:

    python benchmarks/torch_export.py --export=DIR [--data=data/digits] [--image-size=N]

``--export`` takes anything ``byol_flax.evaluation``'s ``--source`` does (an export directory
or a pre-training workdir). Needs the torch extra: ``pip install -e '.[torch]'``.
"""

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

from byol_flax.runtime.xla import configure_xla_flags

configure_xla_flags()  # before JAX starts, as the entry points do
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from byol_flax.configs import eval_digits  # noqa: E402
from byol_flax.data.augment import normalize, to_unit_float  # noqa: E402
from byol_flax.data.convert import digits  # noqa: E402
from byol_flax.data.pipeline import eval_dataset, open_split  # noqa: E402
from byol_flax.data.records import MANIFEST_NAME  # noqa: E402
from byol_flax.evaluation.classifier import make_inference_fn  # noqa: E402
from byol_flax.evaluation.features import extract_features  # noqa: E402
from byol_flax.evaluation.knn import knn_accuracy  # noqa: E402
from byol_flax.export import torch_format  # noqa: E402
from byol_flax.export.torch_resnet import load_torch_encoder  # noqa: E402
from byol_flax.sharding import make_mesh  # noqa: E402
from byol_flax.weights.encoder import load_source  # noqa: E402


def eval_images(config, opened) -> np.ndarray:
    """The evaluation view of every record, in order, normalised, NCHW (the torch input)."""
    batches = [np.asarray(normalize(to_unit_float(jnp.asarray(batch["image"]))))
               for batch in eval_dataset(config, opened, batch_size=config.feature_batch_size)]
    return np.concatenate(batches).transpose(0, 3, 1, 2).copy()


def torch_features(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(images[i:i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def stock_torchvision(path: Path, name: str | None) -> torch.nn.Module | None:
    """torchvision's ``name`` with the file's weights (``fc`` removed), if both exist."""
    if name is None or importlib.util.find_spec("torchvision") is None:
        return None
    import torchvision
    model = getattr(torchvision.models, name)(weights=None)
    model.fc = torch.nn.Identity()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def compare(reference: np.ndarray, features: np.ndarray) -> dict[str, float]:
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    cosine = np.sum(unit(reference) * unit(features), axis=-1)
    return {"max_abs_diff": float(np.abs(features - reference).max()),
            "relative_diff": float(np.abs(features - reference).max()
                                   / np.abs(reference).mean()),
            "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", required=True, help="export directory or pre-training workdir")
    parser.add_argument("--data", default="data/digits", help="digits ArrayRecord directory "
                        "(written with byol_flax.data.convert.digits when missing)")
    parser.add_argument("--image-size", type=int, default=0,
                        help="evaluation view size, px (default: the pre-training's crop size)")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    start = time.perf_counter()
    if not (Path(args.data) / MANIFEST_NAME).exists():
        assert digits.main(["--out", args.data, "--holdout-count", "150", "--no-progress"]) == 0
    pretrained = load_source(args.export)
    size = args.image_size or (pretrained.pretrain_config or {}).get("data", {}).get(
        "image_size", eval_digits.get_config().data.image_size)
    config = eval_digits.get_config(f"knn,data={args.data},image_size={size}")
    mesh = make_mesh()
    train, test = (open_split(config.data, config.data[key]) for key in ("train_split",
                                                                          "test_split"))
    knn = lambda tr, te: knn_accuracy(tr, te, ks=config.knn.k,
                                      temperature=config.knn.temperature,
                                      num_classes=config.data.num_classes)[config.knn.k[0]]

    timings, features = {}, {}
    tick = time.perf_counter()
    embed, weights = make_inference_fn(pretrained.encoder, mesh)
    batch = config.feature_batch_size
    features["jax"] = {name: extract_features(embed, weights, opened, config, mesh,
                                              batch_size=batch)
                       for name, opened in (("train", train), ("test", test))}
    timings["jax"] = time.perf_counter() - tick
    images = {"train": eval_images(config, train), "test": eval_images(config, test)}
    for split in images:  # the same records in the same order as the JAX features
        assert len(images[split]) == len(features["jax"][split][1])

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / torch_format.WEIGHTS_NAME
        arch = torch_format.save_torch_weights(pretrained, path)
        models = {"torch_same": load_torch_encoder(path, padding="same")}
        stock = stock_torchvision(path, arch["torchvision_equivalent"])
        if stock is not None:
            models[f"torchvision_{arch['torchvision_equivalent']}"] = stock
            note = "(iii) is stock torchvision.models." + arch["torchvision_equivalent"]
        else:
            models["torch_symmetric"] = load_torch_encoder(path, padding="symmetric")
            why = ("torchvision is not installed" if importlib.util.find_spec("torchvision")
                   is None else "the architecture is not one of torchvision's")
            note = ("(iii) is torch_resnet with padding='symmetric', torchvision's padding "
                    f"({why})")
        for name, model in models.items():
            tick = time.perf_counter()
            features[name] = {split: (torch_features(model, images[split]),
                                      features["jax"][split][1]) for split in images}
            timings[name] = time.perf_counter() - tick

    rows = {}
    for name, feats in features.items():
        row = compare(features["jax"]["test"][0], feats["test"][0])
        row["knn_top1"] = knn(feats["train"], feats["test"])
        row["seconds"] = timings[name]
        rows[name] = row
    encoder = pretrained.model_config["encoder"]
    print(f"\n{args.export}: {json.dumps(encoder)}, {size} px, test split "
          f"({len(images['test'])} images) against the train split ({len(images['train'])}); "
          f"kNN k={config.knn.k[0]}, T={config.knn.temperature}; {note}\n")
    print("| features | max abs diff vs JAX | max diff / mean abs JAX | cosine to JAX (mean, min) "
          "| kNN top-1 | seconds |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['max_abs_diff']:.2e} | {row['relative_diff']:.2e} | "
              f"{row['cosine_mean']:.6f}, {row['cosine_min']:.6f} | {row['knn_top1']:.4f} | "
              f"{row['seconds']:.1f} |")
    print(json.dumps({"benchmark": "torch_export", "export": args.export, "encoder": encoder,
                      "image_size": size, "note": note, "rows": rows,
                      "total_seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
