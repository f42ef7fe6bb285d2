"""Mixed-precision bit planning (HAWQ-V3 style) as an integer linear program.

Each layer gets one bit width from a small set (default {4, 8}); weights and activations of a layer share
it. The plan minimizes the expected loss increase sum_i sensitivity_i * ||Q_b(W_i) - W_i||^2 (sensitivity =
Hessian trace / number of parameters), subject to optional budgets on model size, BOPS and latency, pinned
layers and tied groups. It is an ILP with one boolean per (layer, bit) and a one-hot row per layer, built with
cvxpy and solved exactly by HiGHS: with a handful of constraints the search is fast and the optimum is
exact, unlike a greedy or a relaxation.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IntforgeError

__all__ = ["KINDS", "PLAN_FORMAT", "Budget", "Plan", "PlanError", "PlanInfeasibleError", "PlanLayer", "pareto",
           "perturbations", "plan", "plot_pareto"]

KINDS = ("size", "bops", "latency")
PLAN_FORMAT = "intforge-plan/1"

# A budget counts as met when the plan's quantity exceeds the limit by at most this fraction of the total
# magnitude of that quantity (floating-point slack, e.g. a relative budget of 1.0 rebuilt from low + high).
_REL_TOL = 1e-9
# HiGHS tolerances: exact optimum (no MIP gap), and tight feasibility on the row-scaled budget constraints.
_HIGHS_OPTIONS = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "mip_feasibility_tolerance": 1e-9,
                  "primal_feasibility_tolerance": 1e-9, "output_flag": False}
_NAMES = {"size": "model size", "bops": "BOPS", "latency": "latency"}


class PlanError(IntforgeError, ValueError):
    """The planner's input is inconsistent (unknown layer names, bad budgets, missing data...)."""


class PlanInfeasibleError(PlanError):
    """No bit assignment meets a budget under the pins, ties and the other budgets.

    `budget` is the budget that cannot be met, `minimal` the smallest value of its quantity reachable under
    the other constraints (bytes, BOPS or ms), `minimal_fraction` the same as a fraction between all-lowest
    and all-highest bits (None if those coincide), and `under` the other budgets that were kept.
    """

    def __init__(self, message: str, budget: Budget, minimal: float, minimal_fraction: float | None,
                 under: tuple[Budget, ...]):
        super().__init__(message)
        self.budget = budget
        self.minimal = minimal
        self.minimal_fraction = minimal_fraction
        self.under = under


def _index(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise PlanError(f"{what} must be an integer, got {value!r}") from None


def _real(value: Any, what: str, minimum: float | None = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise PlanError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(out) or (minimum is not None and out < minimum):
        bound = f" and >= {minimum:g}" if minimum is not None else ""
        raise PlanError(f"{what} must be finite{bound}, got {value!r}")
    return out


def _bit_table(table: Mapping[Any, Any], what: str) -> dict[int, float]:
    if not isinstance(table, Mapping) or not table:
        raise PlanError(f"{what} must be a non-empty dict bit width -> value, got {table!r}")
    return {_index(b, f"a bit width in {what}"): _real(v, f"{what}[{b}]") for b, v in table.items()}


@dataclass
class PlanLayer:
    """One quantizable layer as the planner sees it.

    `perturbation[b]` is ||Q_b(W) - W||^2 (see `perturbations`), `sensitivity` the Hessian trace divided by
    the parameter count, `macs` the multiply-accumulates per inference (BOPS at b bits = macs * b * a, a the
    bits of its input activations: `input_bits[b]`, by default b itself), and `latency_ms[b]` an optional
    measured latency.
    """

    name: str
    params: int
    macs: int
    sensitivity: float
    perturbation: dict[int, float]
    latency_ms: dict[int, float] | None = None
    input_bits: dict[int, int] | None = None  # (W4A8: {4: 8, 8: 8})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlanError(f"a layer name must be a non-empty string, got {self.name!r}")
        self.params = _index(self.params, f"params of layer {self.name!r}")
        self.macs = _index(self.macs, f"macs of layer {self.name!r}")
        if self.params < 0 or self.macs < 0:
            raise PlanError(f"layer {self.name!r}: params and macs must be >= 0, got {self.params}, {self.macs}")
        self.sensitivity = _real(self.sensitivity, f"sensitivity of layer {self.name!r}")
        self.perturbation = _bit_table(self.perturbation, f"perturbation of layer {self.name!r}")
        if self.latency_ms is not None:
            self.latency_ms = _bit_table(self.latency_ms, f"latency_ms of layer {self.name!r}")

    def cost(self, kind: str, bits: int) -> float:
        """The layer's share of a budget quantity at `bits`: bytes of weights, BOPS, or milliseconds."""
        if kind == "size":
            return self.params * bits / 8
        if kind == "bops":
            return float(self.macs * bits * (self.input_bits or {}).get(bits, bits))
        if kind == "latency":
            if self.latency_ms is None or bits not in self.latency_ms:
                raise PlanError(f"layer {self.name!r} has no latency measurement at {bits} bits")
            return self.latency_ms[bits]
        raise PlanError(f"unknown budget kind {kind!r}; expected one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class Budget:
    """A limit on model size (bytes of weights), BOPS or latency (ms).

    With `relative=True`, `value` is a fraction f in [0, 1]: the limit is low + f * (high - low), where low
    and high are the quantity with every layer at the lowest and at the highest candidate bit width.
    """

    kind: str
    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"unknown budget kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.relative, bool | np.bool_):
            raise PlanError(f"Budget.relative must be True or False, got {self.relative!r}")
        object.__setattr__(self, "relative", bool(self.relative))
        value = _real(self.value, f"the {self.kind} budget", minimum=None)
        if self.relative and not 0.0 <= value <= 1.0:
            raise PlanError(f"a relative {self.kind} budget is a fraction between all-lowest-bit (0) and "
                            f"all-highest-bit (1); got {value!r}. Use relative=False for an absolute limit.")
        if not self.relative and value < 0:
            raise PlanError(f"an absolute {self.kind} budget must be >= 0, got {value!r}")
        object.__setattr__(self, "value", value)

    def describe(self) -> str:
        """Short human form, e.g. 'size <= 1.5 MB' or 'bops at fraction 0.25'."""
        if self.relative:
            return f"{self.kind} at fraction {self.value:g}"
        return f"{self.kind} <= {_fmt(self.kind, self.value)}"


def _fmt(kind: str, value: float) -> str:
    """A budget quantity with its unit."""
    if kind == "size":
        if abs(value) >= 1e6:
            return f"{value / 1e6:.6g} MB"
        if abs(value) >= 1e3:
            return f"{value / 1e3:.6g} kB"
        return f"{value:.6g} B"
    if kind == "bops":
        if abs(value) >= 1e9:
            return f"{value / 1e9:.6g} GBOPs"
        return f"{value / 1e6:.6g} MBOPs" if abs(value) >= 1e6 else f"{value:.6g} BOPs"
    return f"{value:.6g} ms"


def perturbations(weight: np.ndarray, bits: Iterable[int] = (4, 8), int4_clip: str = "max") -> dict[int, float]:
    """||Q_b(W) - W||^2 for each bit width b, the planner's per-layer quantization error.

    Q_b is `quantize.quantize_weight`, as intforge quantizes weights: symmetric per output channel (axis
    0), scale = max|W_c| / (2^(b-1) - 1), round half to even, clip to +-(2^(b-1) - 1); a channel of zeros
    quantizes exactly. At 4 bits or fewer with `int4_clip="mse"` (`QuantConfig.int4_clip`), each
    channel's scale is instead that of the clipping range with the least squared error; "output" (which
    weighs errors by calibration inputs the planner does not have) is estimated as "mse" here, and
    measured by `bitplan.deployed_int4_perturbations` where there is calibration data.
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim == 0 or w.shape[0] == 0:
        raise PlanError(f"perturbations needs a weight with output channels on axis 0, got shape {w.shape}")
    if not np.isfinite(w).all():
        raise PlanError("perturbations: the weight contains NaN or infinity")
    from .quantize import quantize_weight  # the one definition of weight quantization

    w = w.reshape(w.shape[0], -1)
    out = {}
    for b in bits:
        b = _index(b, "a bit width")
        if not 2 <= b <= 8:
            raise PlanError(f"bit widths must be between 2 and 8 for weight quantization, got {b}")
        q, scale = quantize_weight(w, b, int4_clip if b <= 4 else "max")  # ("output" without inputs: as "mse")
        out[b] = float(np.sum((q.astype(np.float64) * scale.reshape(-1, 1) - w) ** 2))
    return out


_CVXPY: Any = None


def _cvxpy() -> Any:
    """cvxpy, after checking that its HiGHS backend (the MILP solver the planner relies on) is installed."""
    global _CVXPY
    if _CVXPY is None:
        try:
            import cvxpy as cp
        except ImportError:
            raise PlanError("the bit planner needs cvxpy and the HiGHS solver: pip install cvxpy highspy") from None
        if cp.HIGHS not in cp.installed_solvers():
            raise PlanError("the bit planner needs the HiGHS MILP solver, which cvxpy cannot find: "
                            "pip install highspy")
        _quiet_highs_banner()
        _CVXPY = cp
    return _CVXPY


def _quiet_highs_banner() -> None:
    """HiGHS prints a copyright banner from C++ the first time a solver is made; send it to /dev/null."""
    try:
        import highspy

        sys.stdout.flush()
        saved = os.dup(1)
    except (ImportError, OSError, ValueError):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        highspy.Highs()
    except OSError:
        pass
    finally:
        os.dup2(saved, 1)
        os.close(saved)


@dataclass
class Plan:
    """The chosen bit width per layer and what it costs.

    `objective` is sum_i sensitivity_i * perturbation_i[bits_i]; `size_bytes` the weight bytes, `bops` the
    bit operations, `latency_ms` the summed measured latency (None without measurements); `budgets` the
    budgets given and `limits` their absolute limits; `status` 'optimal' or 'time_limit' (best found).
    """

    bits: dict[str, int]
    objective: float
    size_bytes: float
    bops: float
    latency_ms: float | None
    budgets: tuple[Budget, ...] = ()
    limits: dict[str, float] = field(default_factory=dict)
    status: str = "optimal"
    bit_choices: tuple[int, ...] = (4, 8)
    pin: dict[str, int] = field(default_factory=dict)
    tie: list[list[str]] = field(default_factory=list)
    layers: tuple[PlanLayer, ...] = field(default=(), repr=False)
    int4_clip: str = "output"  # how its 4-bit layers' weights were taken to be quantized (`QuantConfig.int4_clip`)
    int4_rounding: str = "nearest"  # and rounded (`QuantConfig.int4_rounding`)

    @property
    def int4_input_bits(self) -> int:
        """The input activations' bits of the plan's 4-bit layers (`QuantConfig.int4_input_bits`): 8 where
        the plan was made for W4A8, else 4."""
        return next((lay.input_bits[4] for lay in self.layers if lay.input_bits and 4 in lay.input_bits), 4)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (see `to_json`)."""
        layers = self.layers or tuple(PlanLayer(n, 0, 0, 0.0, {b: 0.0}) for n, b in self.bits.items())
        return {
            "format": PLAN_FORMAT,
            "bit_choices": list(self.bit_choices),
            "objective": self.objective,
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "latency_ms": self.latency_ms,
            "status": self.status,
            "budgets": [{"kind": b.kind, "value": b.value, "relative": b.relative, "limit": self.limits.get(b.kind)}
                        for b in self.budgets],
            "pin": dict(self.pin),
            "tie": [list(g) for g in self.tie],
            "int4_clip": self.int4_clip,
            "int4_rounding": self.int4_rounding,
            "layers": [{"name": lay.name, "bits": self.bits[lay.name], "params": lay.params, "macs": lay.macs,
                        "sensitivity": lay.sensitivity,
                        "perturbation": {str(b): v for b, v in lay.perturbation.items()},
                        "latency_ms": None if lay.latency_ms is None
                        else {str(b): v for b, v in lay.latency_ms.items()},
                        **({} if lay.input_bits is None
                           else {"input_bits": {str(b): a for b, a in lay.input_bits.items()}})}
                       for lay in layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of `to_dict`; refuses anything that is not an intforge plan."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise PlanError(f"not an intforge bit plan (format {found!r}, expected {PLAN_FORMAT!r})")
        try:
            layers = tuple(PlanLayer(d["name"], d["params"], d["macs"], d["sensitivity"],
                                     {int(b): v for b, v in d["perturbation"].items()},
                                     None if d.get("latency_ms") is None
                                     else {int(b): v for b, v in d["latency_ms"].items()},
                                     None if d.get("input_bits") is None
                                     else {int(b): int(a) for b, a in d["input_bits"].items()})
                           for d in data["layers"])
            return cls(bits={d["name"]: int(d["bits"]) for d in data["layers"]},
                       objective=float(data["objective"]), size_bytes=float(data["size_bytes"]),
                       bops=float(data["bops"]),
                       latency_ms=None if data["latency_ms"] is None else float(data["latency_ms"]),
                       budgets=tuple(Budget(b["kind"], b["value"], b["relative"]) for b in data["budgets"]),
                       limits={b["kind"]: float(b["limit"]) for b in data["budgets"] if b.get("limit") is not None},
                       status=str(data["status"]), bit_choices=tuple(int(b) for b in data["bit_choices"]),
                       pin={k: int(v) for k, v in data.get("pin", {}).items()},
                       tie=[list(g) for g in data.get("tie", [])], layers=layers,
                       int4_clip=str(data.get("int4_clip", "max")),  # (plans from before the choice: max)
                       int4_rounding=str(data.get("int4_rounding", "nearest")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed bit plan: {exc!r}") from None

    def to_json(self, path: str | Path) -> Path:
        """Write the plan as JSON (format field, totals, budgets, and one entry per layer); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Plan:
        """Read a plan written by `to_json`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"bit plan {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise PlanError(f"bit plan {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """A human-readable table of the layers' bits followed by the totals and the budgets."""
        lines = []
        if self.layers:
            width = max(12, *(len(lay.name) for lay in self.layers))
            lines.append(f"{'layer':<{width}} {'params':>10} {'MACs':>13} {'sensitivity':>12} {'bits':>4}")
            for lay in self.layers:
                lines.append(f"{lay.name:<{width}} {lay.params:>10} {lay.macs:>13} {lay.sensitivity:>12.4g} "
                             f"{self.bits[lay.name]:>4}")
        counts = {b: sum(1 for v in self.bits.values() if v == b) for b in sorted(set(self.bits.values()))}
        lines.append("bits: " + ", ".join(f"{n} layer{'s' if n != 1 else ''} at {b}" for b, n in counts.items()))
        lines.append(f"objective (sum sensitivity * ||Q(W)-W||^2): {self.objective:.6g}")
        totals = [("size", self.size_bytes), ("bops", self.bops), ("latency", self.latency_ms)]
        for kind, value in totals:
            if value is None:
                continue
            text = f"{_NAMES[kind]}: {_fmt(kind, value)}"
            if self.layers and (kind != "latency" or all(lay.latency_ms for lay in self.layers)):
                try:
                    lo, hi = (sum(lay.cost(kind, b) for lay in self.layers)
                              for b in (min(self.bit_choices), max(self.bit_choices)))
                    text += (f"  (all-{min(self.bit_choices)}-bit {_fmt(kind, lo)}, "
                             f"all-{max(self.bit_choices)}-bit {_fmt(kind, hi)})")
                except PlanError:
                    pass
            lines.append(text)
        for b in self.budgets:
            limit = self.limits.get(b.kind)
            extra = f" (limit {_fmt(b.kind, limit)})" if b.relative and limit is not None else ""
            lines.append(f"budget: {b.describe()}{extra}")
        if self.pin:
            lines.append("pinned: " + ", ".join(f"{k}={v}" for k, v in self.pin.items()))
        for group in self.tie:
            lines.append("tied: " + ", ".join(group))
        lines.append(f"status: {self.status}")
        return "\n".join(lines)


class _Problem:
    """Validated layers, candidate bits, pins and ties, with the cost matrices the ILPs are built from."""

    def __init__(self, layers: Sequence[PlanLayer], bits: Iterable[int], pin: Mapping[str, int] | None,
                 tie: Sequence[Sequence[str]] | None, pin_first_last: bool, time_limit_s: float):
        self.layers = tuple(layers)
        if not self.layers:
            raise PlanError("the planner needs at least one layer")
        for lay in self.layers:
            if not isinstance(lay, PlanLayer):
                raise PlanError(f"layers must be PlanLayer objects, got {type(lay).__name__}")
        names = [lay.name for lay in self.layers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanError(f"duplicate layer names: {', '.join(dup)}")
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        if isinstance(bits, int):
            bits = (bits,)
        self.bits = tuple(sorted({_index(b, "a candidate bit width") for b in bits}))
        if not self.bits or self.bits[0] < 1:
            raise PlanError(f"candidate bit widths must be positive integers, got {bits!r}")
        for lay in self.layers:
            missing = [b for b in self.bits if b not in lay.perturbation]
            if missing:
                raise PlanError(f"layer {lay.name!r} has no perturbation for {missing} bits; compute it with "
                                f"intforge.planner.perturbations(weight, bits={self.bits})")
        self.time_limit_s = _real(time_limit_s, "time_limit_s")
        self.objective = np.array([[lay.sensitivity * lay.perturbation[b] for b in self.bits]
                                   for lay in self.layers])
        self.pin = self._pins(pin, pin_first_last)
        self.tie = self._ties(tie)
        self._check_pins_in_ties()
        self._costs: dict[str, np.ndarray] = {}

    # ---- validation -------------------------------------------------------------------------------------
    def _unknown(self, names: Iterable[str], where: str) -> None:
        bad = [n for n in names if n not in self.index]
        if bad:
            raise PlanError(f"unknown layer name(s) in {where}: {', '.join(map(repr, bad))}. "
                            f"Valid names: {', '.join(self.names)}")

    def _pins(self, pin: Mapping[str, int] | None, pin_first_last: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        if pin_first_last:
            out[self.names[0]] = out[self.names[-1]] = self.bits[-1]
        if pin is not None:
            if not isinstance(pin, Mapping):
                raise PlanError(f"pin must be a dict layer name -> bits, got {type(pin).__name__}")
            self._unknown(pin, "pin")
            for name, b in pin.items():   # explicit pins override pin_first_last
                b = _index(b, f"the pinned bit width of {name!r}")
                if b not in self.bits:
                    raise PlanError(f"layer {name!r} is pinned to {b} bits, which is not a candidate bit width "
                                    f"{list(self.bits)}; add it to bits=")
                out[name] = b
        return out

    def _ties(self, tie: Sequence[Sequence[str]] | None) -> list[list[str]]:
        """Tied groups merged where they overlap (union-find), in layer order."""
        if tie is None:
            return []
        if isinstance(tie, str) or not all(not isinstance(g, str) and isinstance(g, Iterable) for g in tie):
            raise PlanError("tie must be a list of groups, each a list of layer names, e.g. "
                            "[['layer1.0.conv2', 'layer1.0.downsample.0']]")
        parent = list(range(len(self.layers)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for group in tie:
            group = list(group)
            self._unknown(group, "tie")
            for name in group[1:]:
                parent[root(self.index[name])] = root(self.index[group[0]])
        groups: dict[int, list[str]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(root(i), []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    def _check_pins_in_ties(self) -> None:
        for group in self.tie:
            pinned = {n: self.pin[n] for n in group if n in self.pin}
            if len(set(pinned.values())) > 1:
                raise PlanError("tied layers are pinned to different bit widths: "
                                + ", ".join(f"{n}={b}" for n, b in pinned.items())
                                + f" (tied group: {', '.join(group)}); pin them alike or untie them")

    # ---- costs and limits -------------------------------------------------------------------------------
    def cost(self, kind: str) -> np.ndarray:
        """(layers x bits) matrix of a budget quantity."""
        if kind not in self._costs:
            if kind == "latency":
                lacking = [lay.name for lay in self.layers
                           if lay.latency_ms is None or any(b not in lay.latency_ms for b in self.bits)]
                if lacking:
                    raise PlanError(f"a latency budget needs latency_ms for every layer at every candidate bit "
                                    f"width {list(self.bits)}; missing for: {', '.join(lacking)}. Measure them "
                                    f"(intforge bench) or use a size or bops budget.")
            self._costs[kind] = np.array([[lay.cost(kind, b) for b in self.bits] for lay in self.layers])
        return self._costs[kind]

    def ends(self, kind: str) -> tuple[float, float]:
        """The quantity with all layers at the lowest and at the highest candidate bits."""
        c = self.cost(kind)
        return float(c[:, 0].sum()), float(c[:, -1].sum())

    def tol(self, kind: str) -> float:
        return _REL_TOL * float(np.abs(self.cost(kind)).sum(axis=0).max())

    def limit(self, budget: Budget) -> float:
        if not budget.relative:
            self.cost(budget.kind)   # validates latency data
            return budget.value
        lo, hi = self.ends(budget.kind)
        return lo + budget.value * (hi - lo)

    def fraction(self, kind: str, value: float) -> float | None:
        lo, hi = self.ends(kind)
        return None if hi == lo else (value - lo) / (hi - lo)

    def total(self, kind: str, choice: np.ndarray) -> float:
        return math.fsum(self.cost(kind)[np.arange(len(choice)), choice])

    # ---- the ILP ----------------------------------------------------------------------------------------
    def ilp(self, objective: np.ndarray, limits: Mapping[str, float]) -> tuple[np.ndarray | None, str]:
        """Minimize sum(objective * x) over one-hot x under pins, ties and limits; (bit index per layer, status).

        Rows are shifted by each layer's cheapest option and scaled to [0, 1] so that HiGHS's absolute
        tolerances mean the same thing for bytes, BOPS and milliseconds. The answer is checked exactly, and
        a limit broken by more than the floating-point slack is tightened and solved again.
        """
        cp = _cvxpy()
        limits = dict(limits)
        for _ in range(4):
            n, m = objective.shape
            x = cp.Variable((n, m), boolean=True)
            cons = [cp.sum(x, axis=1) == 1]
            for name, b in self.pin.items():
                cons.append(x[self.index[name], self.bits.index(b)] == 1)
            for group in self.tie:
                first = self.index[group[0]]
                cons += [x[self.index[name], :] == x[first, :] for name in group[1:]]
            for kind, limit in limits.items():
                c = self.cost(kind)
                base = c.min(axis=1, keepdims=True)
                span = float((c - base).max()) or 1.0
                cons.append(cp.sum(cp.multiply((c - base) / span, x)) <= (limit - float(base.sum())) / span)
            base = objective.min(axis=1, keepdims=True)
            span = float((objective - base).max()) or 1.0
            problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply((objective - base) / span, x))), cons)
            try:
                problem.solve(solver=cp.HIGHS, time_limit=self.time_limit_s, **_HIGHS_OPTIONS)
            except cp.SolverError as exc:
                raise PlanError(f"the HiGHS solver failed on the bit-planning ILP: {exc}") from None
            if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE, cp.settings.INFEASIBLE_OR_UNBOUNDED):
                return None, "infeasible"
            if x.value is None:
                if problem.status == cp.USER_LIMIT:
                    raise PlanError(f"the bit-planning ILP found no feasible assignment within "
                                    f"time_limit_s={self.time_limit_s:g}; raise it, or add pins/ties")
                raise PlanError(f"the HiGHS solver ended with status {problem.status!r} on the bit-planning ILP")
            choice = np.asarray(x.value).argmax(axis=1)
            over = {k: self.total(k, choice) - lim for k, lim in limits.items()
                    if self.total(k, choice) - lim > self.tol(k)}
            if not over:
                return choice, "optimal" if problem.status == cp.OPTIMAL else "time_limit"
            for k, excess in over.items():     # numerical slack in the solver: tighten and retry
                limits[k] -= 2 * excess
        raise PlanError("the HiGHS solver kept returning assignments that break a budget; "
                        "this is a numerical problem, please report it with the layers")

    # ---- planning ---------------------------------------------------------------------------------------
    def solve(self, budgets: Sequence[Budget]) -> Plan:
        for b in budgets:
            if not isinstance(b, Budget):
                raise PlanError(f"budgets must be Budget objects, got {b!r}")
        kinds = [b.kind for b in budgets]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise PlanError(f"more than one {' and '.join(dup)} budget given; give at most one per kind")
        limits = {b.kind: self.limit(b) for b in budgets}
        choice, status = self.ilp(self.objective, limits)
        if choice is None:
            raise self.diagnose(tuple(budgets), limits)
        return self.make_plan(choice, status, tuple(budgets), limits)

    def make_plan(self, choice: np.ndarray, status: str, budgets: tuple[Budget, ...],
                  limits: dict[str, float]) -> Plan:
        bits = {name: self.bits[j] for name, j in zip(self.names, choice, strict=True)}
        layers = self.layers
        has_latency = all(lay.latency_ms is not None and bits[lay.name] in lay.latency_ms for lay in layers)
        return Plan(
            bits=bits,
            objective=math.fsum(self.objective[np.arange(len(choice)), choice]),
            size_bytes=sum(lay.params * bits[lay.name] for lay in layers) / 8,
            bops=float(sum(lay.cost("bops", bits[lay.name]) for lay in layers)),
            latency_ms=math.fsum(lay.latency_ms[bits[lay.name]] for lay in layers) if has_latency else None,
            budgets=budgets, limits=limits, status=status, bit_choices=self.bits, pin=dict(self.pin),
            tie=[list(g) for g in self.tie], layers=layers)

    def diagnose(self, budgets: tuple[Budget, ...], limits: dict[str, float]) -> PlanInfeasibleError:
        """Name the budget that cannot be met, with its smallest reachable value under the other constraints.

        First, for each budget in turn, minimize its quantity under pins, ties and all the other budgets: if
        that is feasible, this budget is the one to relax. If every such problem is infeasible (three budgets
        in mutual conflict), keep budgets in the given order and blame the first one that breaks the prefix.
        """
        for b in budgets:
            under = tuple(o for o in budgets if o is not b)
            choice, _ = self.ilp(self.cost(b.kind), {o.kind: limits[o.kind] for o in under})
            if choice is not None:
                return self.infeasible(b, limits[b.kind], self.total(b.kind, choice), under)
        for i, b in enumerate(budgets):
            under = budgets[:i]
            choice, _ = self.ilp(self.cost(b.kind), {o.kind: limits[o.kind] for o in under})
            assert choice is not None   # the prefix was feasible at the previous step (no budgets: always)
            minimal = self.total(b.kind, choice)
            if minimal > limits[b.kind] + self.tol(b.kind):
                return self.infeasible(b, limits[b.kind], minimal, under)
        raise AssertionError("diagnose called on a feasible problem")

    def infeasible(self, budget: Budget, limit: float, minimal: float,
                   under: tuple[Budget, ...]) -> PlanInfeasibleError:
        kind = budget.kind
        frac = self.fraction(kind, minimal)
        lo, hi = self.ends(kind)
        asked = f"{_fmt(kind, limit)}"
        if budget.relative:
            asked += (f" (fraction {budget.value:g} of the way from all-{self.bits[0]}-bit {_fmt(kind, lo)} "
                      f"to all-{self.bits[-1]}-bit {_fmt(kind, hi)})")
        context = []
        if self.pin:
            context.append("the pinned layers (" + ", ".join(f"{n}={b}" for n, b in self.pin.items()) + ")")
        if 0 < len(self.tie) <= 3:
            context += [f"the tied group ({', '.join(g)})" for g in self.tie]
        elif self.tie:
            context.append(f"{len(self.tie)} tied groups")
        context += [f"the {o.kind} budget ({'fraction ' if o.relative else '<= '}"
                    f"{f'{o.value:g}' if o.relative else _fmt(o.kind, o.value)})" for o in under]
        where = ""
        if context:
            where = " under " + (context[0] if len(context) == 1 else ", ".join(context[:-1]) + " and " + context[-1])
        reach = _fmt(kind, minimal)
        if frac is not None:
            reach += f" (fraction {frac:.4g})"
        advice = [f"raise the {kind} budget to at least {_fmt(kind, minimal)}"
                  + (f" (relative: >= {math.ceil(frac * 1e4) / 1e4:g})" if frac is not None else "")]
        if self.pin or self.tie:
            advice.append(" or ".join(w for w, on in (("unpin", self.pin), ("untie", self.tie)) if on) + " layers")
        if under:
            advice.append("relax the " + " / ".join(o.kind for o in under) + " budget")
        if kind != "latency" and self.bits[0] > 2:
            advice.append("add a lower candidate bit width")
        message = (f"the {_NAMES[kind]} budget cannot be met: it allows {asked}, but the smallest "
                   f"{_NAMES[kind]} reachable{where} is {reach}. To fix it, " + ", or ".join(advice) + ".")
        return PlanInfeasibleError(message, budget, minimal, frac, under)


def _budgets(budgets: Budget | Iterable[Budget]) -> tuple[Budget, ...]:
    return (budgets,) if isinstance(budgets, Budget) else tuple(budgets)


def plan(layers: Sequence[PlanLayer], bits: Iterable[int] = (4, 8), budgets: Budget | Iterable[Budget] = (),
         pin: Mapping[str, int] | None = None, tie: Sequence[Sequence[str]] | None = None,
         pin_first_last: bool = False, *, time_limit_s: float = 60.0) -> Plan:
    """Choose a bit width per layer minimizing sum sensitivity * perturbation under the budgets.

    `pin` fixes layers to a bit width; `pin_first_last` pins the first and last layer (in list order) to the
    highest candidate (explicit `pin` entries win); `tie` lists groups of layers that must share their bits.
    Raises `PlanInfeasibleError` naming the budget that cannot be met and its smallest reachable value.
    """
    problem = _Problem(layers, bits, pin, tie, pin_first_last, time_limit_s)
    return problem.solve(_budgets(budgets))


def pareto(layers: Sequence[PlanLayer], kind: str = "size", points: int = 11, bits: Iterable[int] = (4, 8),
           budgets: Budget | Iterable[Budget] = (), pin: Mapping[str, int] | None = None,
           tie: Sequence[Sequence[str]] | None = None, pin_first_last: bool = False, *,
           time_limit_s: float = 60.0) -> list[Plan]:
    """Optimal plans with the `kind` budget swept as a fraction from 0 (all lowest bits) to 1 (all highest).

    Other `budgets` (of other kinds) hold at every point. Fractions that cannot be met under pins, ties and
    those budgets are skipped; if none can, the error for fraction 1 is raised. The swept budget comes
    first in each plan's `budgets`, which `plot_pareto` uses for its axis.
    """
    if kind not in KINDS:
        raise PlanError(f"unknown budget kind {kind!r}; expected one of {', '.join(KINDS)}")
    points = _index(points, "points")
    if points < 2:
        raise PlanError(f"a Pareto sweep needs at least 2 points, got {points}")
    others = _budgets(budgets)
    if any(b.kind == kind for b in others):
        raise PlanError(f"budgets already holds a {kind} budget, the one being swept; drop it")
    problem = _Problem(layers, bits, pin, tie, pin_first_last, time_limit_s)
    plans, last = [], None
    for f in np.linspace(0.0, 1.0, points):
        try:
            plans.append(problem.solve((Budget(kind, float(f), relative=True), *others)))
        except PlanInfeasibleError as exc:
            last = exc
    if not plans and last is not None:
        raise last
    return plans


def plot_pareto(plans: Sequence[Plan], path: str | Path, kind: str | None = None) -> Path:
    """Draw the frontier (objective against the budget quantity) to a PNG; returns the path.

    `kind` defaults to the kind of the first budget of the first plan (the swept one, for `pareto` output).
    Each point is labelled with how many layers run below the highest candidate bit width; the y axis turns
    logarithmic when the objectives span more than two decades.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plans = list(plans)
    if not plans:
        raise PlanError("plot_pareto needs at least one plan")
    if kind is None:
        kind = plans[0].budgets[0].kind if plans[0].budgets else "size"
    if kind not in KINDS:
        raise PlanError(f"unknown budget kind {kind!r}; expected one of {', '.join(KINDS)}")
    scale, unit = {"size": (1e-6, "weights (MB)"), "bops": (1e-9, "GBOPs"), "latency": (1.0, "latency (ms)")}[kind]
    values = [{"size": p.size_bytes, "bops": p.bops, "latency": p.latency_ms}[kind] for p in plans]
    if any(v is None for v in values):
        raise PlanError("plot_pareto over latency needs plans with latency data")
    pts = sorted(zip((v * scale for v in values), (p.objective for p in plans), plans, strict=True),
                 key=lambda t: t[0])
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step([t[0] for t in pts], [t[1] for t in pts], where="post", color="tab:blue", alpha=0.5)
    ax.plot([t[0] for t in pts], [t[1] for t in pts], "o", color="tab:blue")
    for x, y, p in pts:
        top = max(p.bit_choices)
        low = sum(1 for b in p.bits.values() if b < top)
        ax.annotate(f"{low}/{len(p.bits)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ys = [t[1] for t in pts]
    if min(ys) > 0 and max(ys) > 100 * min(ys):   # objectives often span decades across the sweep
        ax.set_yscale("log")
    ax.set_xlabel(unit)
    ax.set_ylabel("sum sensitivity x ||Q(W) - W||^2")
    ax.set_title(f"bit plans: objective vs {_NAMES[kind]} (labels: layers below {max(plans[0].bit_choices)} bits)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
