"""Data-free calibration (ZeroQ): synthesize inputs whose BatchNorm statistics match the model's.

For users with no data: start from Gaussian noise and optimise the inputs so that, at every
BatchNorm layer, the batch mean and standard deviation of its input match the running statistics
the model learned. Calibrating on these "distilled" inputs recovers activation ranges close to the
real data's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .errors import CalibrationError


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """sum over BatchNorm layers of ||mean - running_mean||_2 + ||std - running_std||_2 for input batch x."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    terms: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        a = inputs[0]
        dims = [d for d in range(a.dim()) if d != 1]
        mean = a.mean(dim=dims)
        std = torch.sqrt(a.var(dim=dims, unbiased=False) + module.eps)
        terms.append(torch.linalg.vector_norm(mean - module.running_mean)
                     + torch.linalg.vector_norm(std - torch.sqrt(module.running_var + module.eps)))

    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(terms).sum()


def distill_inputs(model: nn.Module, input_shape: Sequence[int], count: int = 32, iters: int = 200,
                   lr: float = 0.2, seed: int = 0, progress: bool = True) -> np.ndarray:
    """`count` synthetic inputs of shape `input_shape` (no batch dim) matching the model's BN statistics."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise CalibrationError(
            f"distilled calibration needs BatchNorm layers to match, and {type(model).__name__} has none. "
            "Give real calibration data instead (a few hundred samples are enough)."
            + (" (An ONNX file keeps its BatchNorm nodes when exported without folding them into the convs: "
               "torch.onnx.export(..., do_constant_folding=False).)" if hasattr(model, "describe_layer") else "")
        )
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *input_shape, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    from tqdm.auto import tqdm

    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with tqdm(range(iters), desc="distilling calibration data", disable=not progress, leave=False) as bar:
            for _ in bar:
                opt.zero_grad()
                loss = bn_statistics_loss(model, x)
                loss.backward()
                opt.step()
                bar.set_postfix(bn_loss=f"{loss.item():.3g}")
    finally:
        for p, r in zip(params, saved, strict=True):
            p.requires_grad_(r)
    return x.detach().numpy().astype(np.float32)
