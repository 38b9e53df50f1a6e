"""Schedules against the formulas of Appendix A and the values of Appendix J.1."""

import math

import numpy as np
import pytest

from byol_flax.config import IMAGENET_TRAIN_EXAMPLES, base_config, steps_from_epochs
from byol_flax.schedules import build_schedules, learning_rate_schedule, target_ema_schedule


def test_imagenet_durations_match_appendix_j1():
    config = base_config()
    total = steps_from_epochs(config.training.epochs, num_examples=IMAGENET_TRAIN_EXAMPLES,
                              batch_size=config.training.batch_size)
    warmup = steps_from_epochs(config.training.warmup_epochs,
                               num_examples=IMAGENET_TRAIN_EXAMPLES,
                               batch_size=config.training.batch_size)
    assert total == int(1000.0 * 1281167 / 4096) == 312_784  # HPS max_steps
    assert warmup == int(10.0 * 1281167 / 4096) == 3_127  # HPS warmup_steps


@pytest.mark.parametrize("base_ema", [0.996, 0.99, 0.9995])
def test_tau_schedule_at_start_middle_end(base_ema):
    K = 1000
    tau = target_ema_schedule(base_ema=base_ema, total_steps=K)
    np.testing.assert_allclose(tau(0), base_ema, rtol=1e-7)  # tau_0 = tau_base
    np.testing.assert_allclose(tau(K // 2), 1 - (1 - base_ema) / 2, rtol=1e-7)
    np.testing.assert_allclose(tau(K), 1.0, rtol=1e-7)  # tau_K = 1
    k = 123
    np.testing.assert_allclose(
        tau(k), 1 - (1 - base_ema) * (math.cos(math.pi * k / K) + 1) / 2, rtol=1e-6)


def test_constant_tau_for_appendix_j1():
    tau = target_ema_schedule(base_ema=0.0, total_steps=10, kind="constant")
    assert float(tau(0)) == float(tau(7)) == 0.0
    with pytest.raises(ValueError, match="target.schedule"):
        target_ema_schedule(base_ema=0.9, total_steps=10, kind="linear")


def test_learning_rate_schedule_warmup_then_cosine():
    # Appendix A: LR = 0.2 x 4096 / 256 = 3.2 at the end of the warm-up.
    total, warmup = 312_784, 3_127
    lr = learning_rate_schedule(base_learning_rate=0.2, batch_size=4096, warmup_steps=warmup,
                                total_steps=total)
    peak = 0.2 * 4096 / 256
    assert peak == 3.2
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(lr(warmup // 2), peak * (warmup // 2) / warmup, rtol=1e-5)
    np.testing.assert_allclose(lr(warmup), peak, rtol=1e-6)
    middle = warmup + (total - warmup) // 2
    np.testing.assert_allclose(lr(middle), peak / 2, rtol=1e-4)
    np.testing.assert_allclose(lr(total), 0.0, atol=1e-7)


def test_warmup_longer_than_training_is_rejected():
    with pytest.raises(ValueError, match="warmup_steps"):
        learning_rate_schedule(base_learning_rate=0.2, batch_size=256, warmup_steps=11,
                               total_steps=10)


def test_build_schedules_reads_the_config():
    config = base_config()
    config.training.batch_size = 512  # Appendix H: batch 512, base LR 0.4, tau_base 0.9995
    config.optimizer.base_learning_rate = 0.4
    config.target.base_ema = 0.9995
    lr, tau = build_schedules(config, total_steps=100, warmup_steps=10)
    np.testing.assert_allclose(lr(10), 0.4 * 512 / 256, rtol=1e-6)
    np.testing.assert_allclose(tau(0), 0.9995, rtol=1e-7)
