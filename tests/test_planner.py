"""The bit planner: the ILP against brute force over every assignment, budgets, pins, ties, errors, files."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from intforge import planner
from intforge.errors import IntforgeError
from intforge.planner import Budget, Plan, PlanError, PlanInfeasibleError, PlanLayer, pareto, perturbations, plan


def random_layers(rng: np.random.Generator, n: int, bits: tuple[int, ...], monotone_latency: bool = True,
                  with_latency: bool = True) -> list[PlanLayer]:
    """Small random layers whose perturbations come from real quantization of random weights."""
    layers = []
    for i in range(n):
        cout, cin, k = int(rng.integers(2, 17)), int(rng.integers(2, 9)), int(rng.choice([1, 3]))
        w = rng.standard_normal((cout, cin, k, k)) * rng.uniform(0.05, 2.0)
        hw = int(rng.choice([4, 8, 16]))
        macs = cout * cin * k * k * hw * hw
        if with_latency:
            if monotone_latency:
                lat = {b: macs * 1e-6 * (0.5 + 0.1 * b) * rng.uniform(0.8, 1.2) for b in bits}
                lat = dict(zip(bits, sorted(lat.values()), strict=True))
            else:
                lat = {b: rng.uniform(0.01, 1.0) for b in bits}
        layers.append(PlanLayer(f"layer{i}.conv", w.size, macs, float(rng.lognormal(0, 1.5)),
                                perturbations(w, bits), lat if with_latency else None))
    return layers


def cost(layer: PlanLayer, kind: str, b: int) -> float:
    return {"size": layer.params * b / 8, "bops": layer.macs * b * b,
            "latency": (layer.latency_ms or {}).get(b, math.nan)}[kind]


def tolerance(layers: list[PlanLayer], kind: str, bits: tuple[int, ...]) -> float:
    return 1e-9 * max(sum(abs(cost(lay, kind, b)) for lay in layers) for b in bits)


def brute_force(layers, bits, limits: dict[str, float], pin: dict[str, int], tie: list[list[str]],
                minimize: str | None = None):
    """(best value, assignment) over every bit assignment meeting pins, ties and limits, or None.

    Minimizes the planner's objective, or with `minimize` a budget quantity.
    """
    names = [lay.name for lay in layers]
    best = None
    for combo in itertools.product(bits, repeat=len(layers)):
        a = dict(zip(names, combo, strict=True))
        if any(a[n] != b for n, b in pin.items()):
            continue
        if any(len({a[n] for n in group}) > 1 for group in tie):
            continue
        if any(sum(cost(lay, k, a[lay.name]) for lay in layers) > lim + tolerance(layers, k, bits)
               for k, lim in limits.items()):
            continue
        if minimize is None:
            value = math.fsum(lay.sensitivity * lay.perturbation[a[lay.name]] for lay in layers)
        else:
            value = math.fsum(cost(lay, minimize, a[lay.name]) for lay in layers)
        if best is None or value < best[0]:
            best = (value, a)
    return best


def absolute_limit(layers, kind: str, bits, budget: Budget) -> float:
    lo = sum(cost(lay, kind, bits[0]) for lay in layers)
    hi = sum(cost(lay, kind, bits[-1]) for lay in layers)
    return lo + budget.value * (hi - lo) if budget.relative else budget.value


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    bits = (4, 8) if seed % 2 == 0 else (2, 4, 8)
    n = int(rng.integers(3, 9 if len(bits) == 2 else 8))
    layers = random_layers(rng, n, bits, monotone_latency=seed % 3 != 0)
    names = [lay.name for lay in layers]
    budgets = []
    for kind in ("size", "bops", "latency"):
        if rng.random() < 0.6:
            if rng.random() < 0.5:
                budgets.append(Budget(kind, float(rng.uniform(0, 1)), relative=True))
            else:
                lo = sum(cost(lay, kind, bits[0]) for lay in layers)
                hi = sum(cost(lay, kind, bits[-1]) for lay in layers)
                budgets.append(Budget(kind, float(rng.uniform(min(lo, hi), max(lo, hi)))))
    rng.shuffle(budgets)
    pin = {}
    if rng.random() < 0.5:
        pin[names[int(rng.integers(n))]] = int(rng.choice(bits))
    tie = []
    if rng.random() < 0.5:
        tie.append([str(s) for s in rng.choice(names, size=int(rng.integers(2, min(n, 4) + 1)), replace=False)])
    pin_first_last = bool(rng.random() < 0.3)
    return layers, bits, budgets, pin, tie, pin_first_last


def effective_pins(layers, bits, pin, pin_first_last):
    out = {}
    if pin_first_last:
        out[layers[0].name] = out[layers[-1].name] = bits[-1]
    out.update(pin)
    return out


@pytest.mark.parametrize("seed", range(48))
def test_ilp_matches_brute_force(seed):
    layers, bits, budgets, pin, tie, pin_first_last = random_case(seed)
    pins = effective_pins(layers, bits, pin, pin_first_last)
    if any(len({pins[n] for n in g if n in pins}) > 1 for g in tie):
        with pytest.raises(PlanError, match="tied layers are pinned to different bit widths"):
            plan(layers, bits, budgets, pin=pin, tie=tie, pin_first_last=pin_first_last)
        return
    limits = {b.kind: absolute_limit(layers, b.kind, bits, b) for b in budgets}
    expected = brute_force(layers, bits, limits, pins, tie)
    if expected is not None:
        got = plan(layers, bits, budgets, pin=pin, tie=tie, pin_first_last=pin_first_last)
        assert got.status == "optimal"
        assert got.objective == pytest.approx(expected[0], rel=1e-9, abs=1e-300)
        # the plan itself meets every constraint, and its totals are its bits' totals
        assert all(got.bits[n] == b for n, b in pins.items())
        assert all(len({got.bits[n] for n in g}) == 1 for g in tie)
        for kind, lim in limits.items():
            total = sum(cost(lay, kind, got.bits[lay.name]) for lay in layers)
            assert total <= lim + tolerance(layers, kind, bits)
        assert got.size_bytes == pytest.approx(sum(cost(lay, "size", got.bits[lay.name]) for lay in layers))
        assert got.bops == pytest.approx(sum(cost(lay, "bops", got.bits[lay.name]) for lay in layers))
    else:
        with pytest.raises(PlanInfeasibleError) as info:
            plan(layers, bits, budgets, pin=pin, tie=tie, pin_first_last=pin_first_last)
        exc = info.value
        kind = exc.budget.kind
        under = {b.kind: limits[b.kind] for b in exc.under}
        assert exc.budget in budgets and set(exc.under) <= set(budgets) and exc.budget not in exc.under
        smallest = brute_force(layers, bits, under, pins, tie, minimize=kind)
        assert smallest is not None
        assert exc.minimal == pytest.approx(smallest[0], rel=1e-9)
        assert exc.minimal > limits[kind]
        assert _NAME[kind] in str(exc) and "cannot be met" in str(exc)


_NAME = {"size": "model size", "bops": "BOPS", "latency": "latency"}


def test_brute_force_covers_both_verdicts():
    """The random cases above exercise feasible and infeasible budgets, pins and ties alike."""
    verdicts = set()
    for seed in range(48):
        layers, bits, budgets, pin, tie, pfl = random_case(seed)
        pins = effective_pins(layers, bits, pin, pfl)
        limits = {b.kind: absolute_limit(layers, b.kind, bits, b) for b in budgets}
        verdicts.add(brute_force(layers, bits, limits, pins, tie) is not None)
    assert verdicts == {True, False}


@pytest.mark.parametrize("bits", [(4, 8), (2, 4, 8)])
@pytest.mark.parametrize("kind", ["size", "bops", "latency"])
def test_relative_budget_ends(kind, bits):
    layers = random_layers(np.random.default_rng(7), 6, bits)
    low = plan(layers, bits, [Budget(kind, 0.0, relative=True)])
    assert set(low.bits.values()) == {bits[0]}
    high = plan(layers, bits, [Budget(kind, 1.0, relative=True)])
    assert set(high.bits.values()) == {bits[-1]}
    assert high.objective < low.objective
    assert low.limits[kind] == pytest.approx(sum(cost(lay, kind, bits[0]) for lay in layers))


def test_no_budget_picks_the_most_accurate_bits_and_reports_totals():
    layers = random_layers(np.random.default_rng(3), 5, (4, 8))
    p = plan(layers)
    assert set(p.bits.values()) == {8}
    assert p.size_bytes == sum(lay.params for lay in layers)
    assert p.bops == sum(lay.macs * 64 for lay in layers)
    assert p.latency_ms == pytest.approx(sum(lay.latency_ms[8] for lay in layers))
    assert plan(random_layers(np.random.default_rng(3), 5, (4, 8), with_latency=False)).latency_ms is None


def test_pins_and_ties_are_respected():
    bits = (4, 8)
    layers = random_layers(np.random.default_rng(11), 6, bits)
    names = [lay.name for lay in layers]
    free = plan(layers, bits, Budget("size", 0.5, relative=True))
    assert len(set(free.bits.values())) == 2       # a mixed plan: the constraints below bite
    low = [n for n in names if free.bits[n] == 4]
    high = [n for n in names if free.bits[n] == 8]
    tied = plan(layers, bits, Budget("size", 0.5, relative=True), tie=[[low[0], high[0]]])
    assert tied.bits[low[0]] == tied.bits[high[0]]
    assert tied.tie == [sorted([low[0], high[0]], key=names.index)]
    pinned = plan(layers, bits, Budget("size", 0.5, relative=True), pin={high[0]: 4})
    assert pinned.bits[high[0]] == 4
    assert pinned.objective >= free.objective
    ends = plan(layers, bits, Budget("size", 0.9, relative=True), pin={names[-1]: 4}, pin_first_last=True)
    assert ends.bits[names[0]] == 8 and ends.bits[names[-1]] == 4     # explicit pins win
    assert ends.pin == {names[0]: 8, names[-1]: 4}
    # overlapping tie groups merge, and a pin on one member drags the whole group
    merged = plan(layers, bits, tie=[names[0:2], names[1:3]], pin={names[2]: 4})
    assert [merged.bits[n] for n in names[:3]] == [4, 4, 4]
    assert merged.tie == [names[:3]]


def test_infeasible_budget_names_the_budget_and_its_smallest_value():
    bits = (4, 8)
    layers = random_layers(np.random.default_rng(5), 5, bits)
    names = [lay.name for lay in layers]
    with pytest.raises(PlanInfeasibleError) as info:
        plan(layers, bits, [Budget("size", 0.0, relative=True)], pin_first_last=True)
    exc = info.value
    expected = (sum(lay.params for lay in layers[1:-1]) * 4 + (layers[0].params + layers[-1].params) * 8) / 8
    assert exc.minimal == pytest.approx(expected, rel=1e-12)
    assert exc.budget == Budget("size", 0.0, relative=True) and exc.under == ()
    lo, hi = sum(lay.params for lay in layers) / 2, sum(lay.params for lay in layers)
    assert exc.minimal_fraction == pytest.approx((expected - lo) / (hi - lo))
    message = str(exc)
    assert "model size budget cannot be met" in message
    assert names[0] in message and "raise the size budget to at least" in message
    assert isinstance(exc, IntforgeError)
    # an absolute BOPS budget below everything, with a feasible size budget alongside
    size = Budget("size", 0.6, relative=True)
    with pytest.raises(PlanInfeasibleError) as info:
        plan(layers, bits, [size, Budget("bops", 1.0)])
    assert info.value.budget.kind == "bops" and info.value.under == (size,)
    assert info.value.minimal == pytest.approx(sum(lay.macs * 16 for lay in layers))
    assert "relax the size budget" in str(info.value)


def test_json_round_trip(tmp_path):
    bits = (2, 4, 8)
    layers = random_layers(np.random.default_rng(2), 5, bits)
    layers[1].latency_ms = None
    names = [lay.name for lay in layers]
    p = plan(layers, bits, [Budget("bops", 0.3, relative=True), Budget("size", 1e9)], pin={names[0]: 8},
             tie=[[names[2], names[3]]])
    path = p.to_json(tmp_path / "sub" / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == planner.PLAN_FORMAT
    assert [d["name"] for d in data["layers"]] == names
    assert {"name", "bits", "params", "macs", "sensitivity"} <= set(data["layers"][0])
    back = Plan.from_json(path)
    assert back == p
    assert back.summary() == p.summary()
    data["format"] = "something-else"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="not an intforge bit plan"):
        Plan.from_json(path)
    with pytest.raises(PlanError, match="does not exist"):
        Plan.from_json(tmp_path / "missing.json")


def test_summary_lists_layers_totals_and_budgets():
    layers = random_layers(np.random.default_rng(4), 4, (4, 8))
    text = plan(layers, budgets=[Budget("bops", 0.5, relative=True)], pin={"layer0.conv": 4}).summary()
    for needle in ["layer0.conv", "layer3.conv", "objective", "model size", "BOPS", "latency",
                   "budget: bops at fraction 0.5 (limit", "pinned: layer0.conv=4", "status: optimal"]:
        assert needle in text


@pytest.mark.parametrize("kind", ["size", "bops", "latency"])
def test_pareto_is_non_increasing_and_plots(tmp_path, kind):
    bits = (2, 4, 8)
    layers = random_layers(np.random.default_rng(9), 7, bits)
    plans = pareto(layers, kind, points=9, bits=bits)
    assert len(plans) == 9
    objectives = [p.objective for p in plans]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objectives, objectives[1:], strict=False))
    assert objectives[0] > objectives[-1]
    assert all(p.budgets[0].kind == kind for p in plans)
    png = planner.plot_pareto(plans, tmp_path / f"{kind}.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_skips_unreachable_fractions_and_keeps_other_budgets():
    layers = random_layers(np.random.default_rng(9), 6, (4, 8))
    plans = pareto(layers, "size", points=11, pin_first_last=True, budgets=[Budget("bops", 0.8, relative=True)])
    assert 0 < len(plans) < 11
    assert all(p.bits[layers[0].name] == 8 and p.bits[layers[-1].name] == 8 for p in plans)
    assert all(p.bops <= p.limits["bops"] * (1 + 1e-9) for p in plans)
    with pytest.raises(PlanError, match="already holds a size budget"):
        pareto(layers, "size", budgets=[Budget("size", 0.5, relative=True)])
    with pytest.raises(PlanError, match="at least 2 points"):
        pareto(layers, "size", points=1)


def test_perturbations_quantize_per_channel_half_even():
    w = np.array([[7.0, 0.5, 1.5, 2.5], [0.0, 0.0, 0.0, 0.0], [-0.7, 0.35, 0.0, 0.1]])
    got = perturbations(w, bits=(4, 8))
    # channel 0 at 4 bits: scale 1, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even): error 3 * 0.25
    # channel 2 at 4 bits: scale 0.1, 0.35/0.1 = 3.4999999999999996 -> 3: error 0.05^2 (to rounding)
    assert got[4] == pytest.approx(0.75 + 0.05**2, rel=1e-12)
    for b in (4, 8):
        qmax = 2 ** (b - 1) - 1
        expected = 0.0
        for row in w:
            s = np.abs(row).max() / qmax if np.abs(row).max() > 0 else 1.0
            expected += float(((np.clip(np.rint(row / s), -qmax, qmax) * s - row) ** 2).sum())
        assert got[b] == pytest.approx(expected, rel=1e-12)
    conv = np.random.default_rng(0).standard_normal((8, 3, 3, 3))
    p = perturbations(conv, bits=(2, 4, 8))
    assert p[2] > p[4] > p[8] > 0
    with pytest.raises(PlanError, match="between 2 and 8"):
        perturbations(conv, bits=(1,))


def test_clear_errors():
    layers = random_layers(np.random.default_rng(1), 4, (4, 8))
    with pytest.raises(PlanError, match=r"unknown layer name\(s\) in pin: 'nope'.*Valid names: layer0.conv"):
        plan(layers, pin={"nope": 4})
    with pytest.raises(PlanError, match=r"unknown layer name\(s\) in tie: 'ghost'.*layer3.conv"):
        plan(layers, tie=[["layer0.conv", "ghost"]])
    with pytest.raises(PlanError, match="fraction between all-lowest-bit"):
        Budget("size", 1.5, relative=True)
    with pytest.raises(PlanError, match="fraction between all-lowest-bit"):
        Budget("bops", -0.1, relative=True)
    with pytest.raises(PlanError, match="must be >= 0"):
        Budget("size", -1.0)
    with pytest.raises(PlanError, match="unknown budget kind 'energy'"):
        Budget("energy", 0.5, relative=True)
    with pytest.raises(PlanError, match="finite"):
        Budget("size", math.nan)
    with pytest.raises(PlanError, match="not a candidate bit width"):
        plan(layers, pin={"layer1.conv": 2})
    with pytest.raises(PlanError, match="more than one size budget"):
        plan(layers, budgets=[Budget("size", 0.5, relative=True), Budget("size", 1e6)])
    with pytest.raises(PlanError, match="tied layers are pinned to different bit widths"):
        plan(layers, pin={"layer0.conv": 4, "layer1.conv": 8}, tie=[["layer0.conv", "layer1.conv"]])
    with pytest.raises(PlanError, match="no perturbation for \\[2\\] bits"):
        plan(layers, bits=(2, 4, 8))
    with pytest.raises(PlanError, match="duplicate layer names"):
        plan([layers[0], layers[0]])
    with pytest.raises(PlanError, match="sensitivity .* must be finite and >= 0"):
        PlanLayer("x", 1, 1, -1.0, {4: 0.1})
    # a latency budget needs measurements for every layer at every candidate bit width
    layers[2].latency_ms = None
    layers[3].latency_ms = {4: 0.1}
    with pytest.raises(PlanError, match="latency_ms for every layer.*missing for: layer2.conv, layer3.conv"):
        plan(layers, budgets=[Budget("latency", 0.5, relative=True)])
    with pytest.raises(PlanError, match="missing for: layer2.conv"):
        plan(layers, budgets=[Budget("latency", 10.0)])
    assert plan(layers, budgets=[Budget("size", 0.5, relative=True)]).bits   # size budgets need no latency


def test_missing_highs_is_a_clear_error(monkeypatch):
    cp = pytest.importorskip("cvxpy")
    monkeypatch.setattr(planner, "_CVXPY", None)
    monkeypatch.setattr(cp, "installed_solvers", lambda: ["SCIPY"])
    with pytest.raises(PlanError, match="pip install highspy"):
        plan(random_layers(np.random.default_rng(0), 3, (4, 8)))


def test_w4a8_layers_count_8_bit_inputs_in_bops_and_the_plan_keeps_them(tmp_path):
    """A 4-bit choice reading 8-bit inputs (W4A8) costs macs * 4 * 8 BOPS, not 4 * 4; its weight bytes are
    still 4-bit; the plan's JSON keeps the input bits, so `compile --plan` quantizes the same way."""
    w4a8 = [PlanLayer(f"l{i}", 1000, 5000, 1.0 + i, {4: 1.0, 8: 0.1}, input_bits={4: 8, 8: 8}) for i in range(3)]
    assert w4a8[0].cost("bops", 4) == 5000 * 32 and w4a8[0].cost("bops", 8) == 5000 * 64
    assert w4a8[0].cost("size", 4) == 500
    got = plan(w4a8, budgets=Budget("size", 0.0, relative=True))
    assert set(got.bits.values()) == {4} and got.bops == 3 * 5000 * 32 and got.int4_input_bits == 8
    back = Plan.from_json(got.to_json(tmp_path / "plan.json"))
    assert back.int4_input_bits == 8 and back.bops == got.bops
    w4a4 = [PlanLayer(f"l{i}", 1000, 5000, 1.0, {4: 1.0, 8: 0.1}) for i in range(3)]
    assert plan(w4a4, budgets=Budget("size", 0.0, relative=True)).int4_input_bits == 4


def test_mse_clip_perturbations_search_each_channels_clipping_range(tmp_path):
    """With int4_clip="mse", a 4-bit channel takes the clipping range (1 to 0.5 of its largest magnitude,
    26 steps) of least squared error: never worse than its largest magnitude, much better with one
    outlier weight; 8 bits keep the largest magnitude; a plan keeps the choice for compile."""
    rng = np.random.default_rng(0)
    w = np.concatenate([np.full((3, 1), 10.0), rng.uniform(-1, 1, (3, 63))], axis=1)
    w[2] = rng.standard_normal(64)
    plain, mse = perturbations(w, bits=(4, 8)), perturbations(w, bits=(4, 8), int4_clip="mse")
    assert mse[8] == plain[8] and mse[4] < 0.95 * plain[4]
    assert perturbations(w, bits=(4, 8), int4_clip="output") == mse  # (no calibration inputs here: as mse)
    expected = 0.0
    for row in w:
        expected += min(float(((np.clip(np.rint(row / (r * np.abs(row).max() / 7)), -7, 7) * (r * np.abs(row).max() / 7)
                                - row) ** 2).sum()) for r in np.linspace(1.0, 0.5, 26))
    assert mse[4] == pytest.approx(expected, rel=1e-12)
    layers = [PlanLayer("a", 192, 1000, 1.0, mse)]
    got = plan(layers, budgets=Budget("size", 0.0, relative=True))
    got.int4_clip = "mse"
    assert Plan.from_json(got.to_json(tmp_path / "plan.json")).int4_clip == "mse"
    from intforge.quantize import QuantConfig, QuantizationError

    with pytest.raises(QuantizationError, match="int4_clip must be one of"):
        QuantConfig(int4_clip="percentile")
