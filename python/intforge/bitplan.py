"""Glue from Hessian analysis to the planner to the compiler: PlanLayers from a captured model,
residual ties, and reading a plan back as per-layer bits."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .capture import FloatGraph
from .errors import IntforgeError
from .hessian import SensitivityReport
from .planner import Plan, PlanLayer, perturbations
from .quantize import PASS_THROUGH, int4_clips


def plan_layers(graph: FloatGraph, report: SensitivityReport, bits: Iterable[int] = (4, 8),
                latency: dict[str, dict[int, float]] | None = None, int4_input_bits: int = 4,
                int4_clip: str = "output", int4_perturbations: dict[str, float] | None = None) -> list[PlanLayer]:
    """One PlanLayer per quantizable layer: size and MACs from the graph, sensitivity from the report,
    perturbation ||Q_b(W) - W||^2 of the deployed (BatchNorm-folded) weight; with `int4_input_bits=8`
    its 4-bit choice reads 8-bit inputs (W4A8, `QuantConfig.int4_input_bits`), which its BOPS count;
    `int4_clip` is how the 4-bit weights will be quantized (`QuantConfig.int4_clip`). The 4-bit
    perturbations are `int4_perturbations`' where given (`deployed_int4_perturbations`: measured on the
    quantized model, which the "output" clip needs), else computed from the weight alone."""
    bits = tuple(bits)
    input_bits = {b: (int4_input_bits if b == 4 else b) for b in bits} if int4_input_bits != 4 else None
    known = {layer.name for layer in report.layers}
    rows = graph.layers()
    missing = [r["name"] for r in rows if r["name"] not in known]
    if missing:
        raise IntforgeError(f"the sensitivity report has no entry for layers {missing}; it was made for another "
                            "model or a subset of layers. Re-run `intforge analyze` on this model.")
    weights = {op.name: op.params["weight"] for op in graph.ops if op.kind in ("conv2d", "linear")}
    clips = int4_clips(graph, int4_clip)
    out = []
    for r in rows:
        s = report.layer(r["name"])
        delta = perturbations(weights[r["name"]], bits, clips[r["name"]])
        if int4_perturbations and 4 in delta and r["name"] in int4_perturbations:
            delta[4] = float(int4_perturbations[r["name"]])
        out.append(PlanLayer(name=r["name"], params=r["params"], macs=r["macs"],
                             sensitivity=max(0.0, float(s.trace_per_param)), perturbation=delta,
                             latency_ms=(latency or {}).get(r["name"]), input_bits=input_bits))
    return out


def deployed_int4_perturbations(graph: FloatGraph, calib: Any, int4_input_bits: int = 4,
                                int4_clip: str = "output", int4_rounding: str = "nearest") -> dict[str, float]:
    """Each conv/linear's ||Q_4(W) - W||^2 as `compile` deploys it at 4 bits: `graph` calibrated on `calib`
    (one array per input) and quantized with every layer at 4 bits (`quantize`, the one quantizer), each
    layer's dequantized weights (their channel steps, and an outlier channel's power of two of its input
    taken back out) against the float graph's (BatchNorm folded). `planner.perturbations` computes the
    same from the weight alone for the "max" and "mse" clips; the "output" clip chooses its steps by the
    error on calibration inputs, which only the quantizer sees.

    With `int4_rounding="gptq"` a layer GPTQ rounds (`quantize.gptq_round`) is measured as its inputs see
    it: tr(D S D^T) K / tr(S), D = Q_4(W) - W, S the mean x x^T of its K-wide input rows (a conv's window
    patches). Where S is a multiple of the identity that is ||D||^2, so nearest rounding's errors
    (uncorrelated with the inputs) measure about the same either way; GPTQ moves the weights further than
    nearest rounding does, towards where the inputs do not reach, and ||D||^2 alone would price its
    layers above nearest rounding's. GPTQ fits the data it rounds on, so the weights are rounded on the
    first 3/4 of the samples and S taken over the other 1/4 (with fewer than 8 samples, all of them).
    MNISTNet's 3136-input linear: 24.0 measured on the 500 digits it was rounded on, 37.5 rounded on 375
    and measured on the other 125, where nearest rounding's measures 81.4 and its ||D||^2 167."""
    from .calibrate import collect_ranges, hessian_key
    from .quantize import QuantConfig, hessian_layers, quantize

    calib = list(calib) if isinstance(calib, (list, tuple)) else [calib]
    config = QuantConfig(bits=4, int4_input_bits=int4_input_bits, int4_clip=int4_clip, int4_rounding=int4_rounding)
    layers = hessian_layers(graph, config)
    if layers and len(calib[0]) >= 8:  # GPTQ fits the samples it rounds on: S from the others
        cut = len(calib[0]) * 3 // 4
        ranges = collect_ranges(graph, [a[:cut] for a in calib], hessians=layers)
        held = collect_ranges(graph, [a[cut:] for a in calib], hessians=layers).hessians
    else:
        ranges = collect_ranges(graph, calib, hessians=layers)
        held = ranges.hessians
    program = quantize(graph, ranges, config)
    ops = {op.name: op for op in graph.ops if op.kind in ("conv2d", "linear")}
    out = {}
    for op in program.ops:
        if op.kind not in ("conv2d", "linear") or op.name not in ops:
            continue
        w = np.asarray(ops[op.name].params["weight"], np.float64)
        q = np.asarray(op.params["weight"], np.float64)
        deq = q * np.asarray(op.params["weight_scale"], np.float64).reshape(-1, *([1] * (q.ndim - 1)))
        exp = program.tensors[op.inputs[0]].channel_exp
        if exp is not None:  # input channel c at 2^k_c times the tensor's step: the weights took the 2^k_c
            deq = deq * np.exp2(-np.asarray(exp, np.float64)).reshape(1, -1, *([1] * (q.ndim - 2)))
        d = (deq - w.reshape(deq.shape)).reshape(len(deq), -1)
        second = held.get(hessian_key(ops[op.name]))
        if second is not None and second.shape == (d.shape[1], d.shape[1]) and np.trace(second) > 0:
            out[op.name] = float(np.sum((d @ second) * d) * d.shape[1] / np.trace(second))
        else:
            out[op.name] = float(np.sum(d ** 2))
    return out


def _nearest_layer(graph: FloatGraph, tensor: str) -> str | None:
    """The conv/linear that produces `tensor`, looking through pass-through ops."""
    op = graph.producer(tensor)
    while op is not None and op.kind in PASS_THROUGH:
        op = graph.producer(op.inputs[0])
    return op.name if op is not None and op.kind in ("conv2d", "linear") else None


def residual_ties(graph: FloatGraph) -> list[list[str]]:
    """For each residual add, the layers ending its two branches (e.g. conv2 and the downsample conv),
    which HAWQ-V3 keeps at the same bits."""
    ties = []
    for op in graph.ops:
        if op.kind == "add":
            group = sorted({n for n in (_nearest_layer(graph, i) for i in op.inputs) if n})
            if len(group) > 1:
                ties.append(group)
    return ties


def read_plan_bits(path: str | Path) -> dict[str, int]:
    """Per-layer bits of a plan written by `intforge plan` (a missing or malformed file is a PlanError)."""
    return dict(Plan.from_json(path).bits)


def read_plan(path: str | Path) -> tuple[dict[str, int], int, str, str]:
    """(per-layer bits, the 4-bit layers' input bits, their weight clip, their rounding) of a plan written
    by `intforge plan`."""
    plan = Plan.from_json(path)
    return dict(plan.bits), plan.int4_input_bits, plan.int4_clip, plan.int4_rounding
