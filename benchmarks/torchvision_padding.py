"""Does ``torch_resnet``'s ``padding="symmetric"`` compute what a stock torchvision ResNet does?

``benchmarks/torch_export.py`` stands in ``padding="symmetric"`` for torchvision where
torchvision cannot be installed (beside the pinned CPU torch it cannot). This checks the
stand-in once, in two environments:

    # 1. with this project (JAX): a ResNet-50, every array random, written as the torch export
    #    plus our JAX features of random images at 32, 33 and 224 px
    .venv/bin/python benchmarks/torchvision_padding.py write --dir=/tmp/tv_check
    # 2. in any environment with torch, torchvision and safetensors (no JAX needed)
    /tmp/tv/bin/python benchmarks/torchvision_padding.py compare --dir=/tmp/tv_check

and prints, per size, the largest difference between torchvision's ``resnet50`` (``fc`` =
``nn.Identity()``, the file loaded with ``strict=True``) and ``torch_resnet`` with each padding,
and between each and our JAX features (random weights: the size of the padding's effect on an
untrained network, not on a trained one).
"""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

SIZES = (32, 33, 224)


def write(directory: Path) -> None:
    import jax
    from flax import nnx

    from byol_flax.config import base_config
    from byol_flax.export import torch_format
    from byol_flax.weights.encoder import PretrainedEncoder, encoder_from_model_config

    model = base_config().model.to_dict()  # resnet50 x1, ImageNet stem: torchvision's shape
    encoder = encoder_from_model_config(model, seed=0)
    rng = np.random.default_rng(0)
    state = nnx.state(encoder)
    pure = nnx.to_pure_dict(state)

    def randomise(path, leaf):
        name = str(path[-1].key)
        if name == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if name in ("mean", "bias"):
            return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.0, leaf.shape).astype(np.float32)
        return np.asarray(leaf)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(randomise, pure))
    nnx.update(encoder, state)
    encoder.eval()
    directory.mkdir(parents=True, exist_ok=True)
    pretrained = PretrainedEncoder(encoder, model, {"kind": "random"})
    torch_format.save_torch_weights(pretrained, directory / torch_format.WEIGHTS_NAME)
    forward = jax.jit(lambda images: encoder(images))
    arrays = {}
    for size in SIZES:
        images = rng.standard_normal((4, size, size, 3)).astype(np.float32)
        arrays[f"images_{size}"] = images.transpose(0, 3, 1, 2).copy()
        arrays[f"jax_{size}"] = np.asarray(forward(images))
    np.savez(directory / "features.npz", **arrays)
    print(f"wrote {directory}")


def compare(directory: Path) -> None:
    import torch
    import torchvision
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location(
        "torch_resnet", Path(__file__).resolve().parents[1] / "byol_flax/export/torch_resnet.py")
    torch_resnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_resnet)  # torch and safetensors only: no JAX here
    weights = directory / "encoder.safetensors"
    stock = torchvision.models.resnet50()
    stock.fc = torch.nn.Identity()
    stock.load_state_dict(load_file(str(weights)), strict=True)
    stock.eval()
    ours = {padding: torch_resnet.load_torch_encoder(weights, padding=padding)
            for padding in ("same", "symmetric")}
    data = np.load(directory / "features.npz")
    rows = []
    with torch.no_grad():
        for size in SIZES:
            images = torch.from_numpy(data[f"images_{size}"])
            features = {"torchvision": stock(images).numpy(),
                        **{f"torch_resnet {p}": m(images).numpy() for p, m in ours.items()},
                        "jax": data[f"jax_{size}"]}
            gap = lambda a, b: float(np.max(np.abs(features[a] - features[b])))
            rows.append({"size": size,
                         "torchvision vs symmetric": gap("torchvision", "torch_resnet symmetric"),
                         "torchvision vs same": gap("torchvision", "torch_resnet same"),
                         "same vs jax": gap("torch_resnet same", "jax"),
                         "torchvision vs jax": gap("torchvision", "jax"),
                         "torchvision vs jax cosine": float(np.mean(
                             np.sum(features["torchvision"] * features["jax"], -1)
                             / np.linalg.norm(features["torchvision"], axis=-1)
                             / np.linalg.norm(features["jax"], axis=-1))),
                         "feature scale": float(np.max(np.abs(features["jax"])))})
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print("| px | torchvision vs symmetric | torchvision vs same | same vs JAX | torchvision vs "
          "JAX | cosine torchvision, JAX | max abs feature |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size']} | {row['torchvision vs symmetric']:.2e} | "
              f"{row['torchvision vs same']:.2e} | {row['same vs jax']:.2e} | "
              f"{row['torchvision vs jax']:.2e} | {row['torchvision vs jax cosine']:.4f} | "
              f"{row['feature scale']:.2f} |")
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("write", "compare"))
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    (write if args.mode == "write" else compare)(args.dir)


if __name__ == "__main__":
    main()
