"""Data-free calibration (ZeroQ): distilled inputs match BatchNorm statistics and calibrate a model."""

import numpy as np
import pytest
import torch
from torch import nn

import intforge
from intforge import reference, zoo
from intforge.distill import bn_statistics_loss, distill_inputs
from intforge.errors import CalibrationError


def small_bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 3)
    return net.eval()


def test_distilled_inputs_match_batchnorm_statistics_far_better_than_noise():
    net = small_bn_net()
    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x = distill_inputs(net, (3, 16, 16), count=16, iters=150, progress=False)
    with torch.no_grad():
        before = bn_statistics_loss(net, noise).item()
        after = bn_statistics_loss(net, torch.from_numpy(x)).item()
    assert x.shape == (16, 3, 16, 16) and x.dtype == np.float32
    assert after < 0.5 * before, (before, after)  # some random BN statistics are unreachable


def test_distilled_calibration_compiles_a_bit_exact_model(tmp_path):
    net = small_bn_net()
    art = intforge.compile(net, (torch.zeros(1, 3, 16, 16),), "distilled", output=tmp_path)
    lib = intforge.load(art.library)
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(lib(x), reference.run_float(lib.program(), x)[0])


def test_resnet18_distillation_reduces_batchnorm_mismatch():
    model = zoo.resnet18()
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = distill_inputs(model, (3, 64, 64), count=2, iters=15, progress=False)
    with torch.no_grad():
        assert bn_statistics_loss(model, torch.from_numpy(x)).item() < bn_statistics_loss(model, noise).item()


def test_model_without_batchnorm_is_refused_with_advice():
    with pytest.raises(CalibrationError, match="has none. Give real calibration data"):
        distill_inputs(zoo.mnist_net(), (1, 28, 28), count=2, iters=1, progress=False)
