"""benchmarks/ops.py: the step's operations, ours against PyTorch's on the same arrays."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import ops


def test_the_traced_split_finds_the_matrix_products_and_only_them():
    """Instructions that compute a product (a dot, or a fusion around one) against the rest."""
    def function(x, w):
        return jnp.tanh(x @ w).sum() + jnp.exp(x).sum()

    x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
    hlo = jax.jit(function).lower(x, w).compile().as_text()
    products = ops.matmul_instructions(hlo)
    assert products, hlo
    names = [line.split("=")[0].split()[-1].lstrip("%") for line in hlo.splitlines()
             if " = " in line and line.strip().split()[0] not in ("ENTRY", "HloModule")]
    assert set(names) - products  # the exp and the reductions are not counted as products


@pytest.mark.slow  # ~20 s: the four operations at vit_micro's shapes, three rounds of one call
def test_both_sides_compute_the_same_gradients_and_every_operation_is_timed():
    """main() checks ours against PyTorch's gradients for every operation before timing them
    (a mismatch raises); the result names each operation with both sides' times."""
    pytest.importorskip("torch")
    result = ops.main(["--model", "vit_micro", "--rounds", "3", "--calls", "1"])
    assert set(result["operations"]) == set(ops.VIT_OPERATIONS)
    for row in result["operations"].values():
        assert row["ours_ms"] > 0 and row["torch_ms"] > 0
        assert row["ours_traced_ms"]["matmuls"] >= 0
    assert result["operations"]["attention_core"]["ours_traced_ms"]["matmuls"] > 0
    assert result["operations"]["gelu"]["ours_traced_ms"]["matmuls"] == 0


@pytest.mark.slow  # ~10 s: two of ResNet-18's convolution parts, three rounds of one call
def test_each_convolution_part_matches_pytorchs_and_is_rated_in_gflops():
    """The forward, input gradient and weight gradient of every 3x3 layer, ours (NHWC, HWIO)
    against PyTorch's (channels-last, OIHW) after the layouts are matched; GFLOP/s counted."""
    pytest.importorskip("torch")
    result = ops.main(["--model", "resnet18", "--rounds", "3", "--calls", "1",
                       "--operations", "4x4 512->512: forward,32x32 64->128 stride 2: "
                                       "weight gradient"])
    rows = result["operations"]
    assert set(rows) == {"4x4 512->512: forward", "32x32 64->128 stride 2: weight gradient"}
    for row in rows.values():
        assert row["gflop"] > 0 and row["ours_gflops"] > 0 and row["torch_gflops"] > 0
