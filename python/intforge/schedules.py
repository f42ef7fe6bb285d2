"""Compare schedules layer by layer: each conv/linear compiled alone under each schedule and timed.

This is how a user "compares TVM schedules": the same layer, same integers, under
- plain: TOPI's NCHW kernels, plain lowering (no schedule: one thread),
- default: TOPI's kernels with intforge's default CPU schedule (outer loops in parallel),
- tensorized: intforge's own kernels, what `compile` uses: the register-blocked kernel tensorized to the
  CPU's dot-product instruction (kernels/blocked_dot.py: `vpdpbusd` on AVX512-VNNI, `sdot`, i8mm or
  NEON on ARM; 3x3 stride-1 convs as Winograd on `vpdpwssd`, kernels/winograd.py, where it pays),
  elsewhere the dot-product layout (kernels/dot_product.py),
- tuned: intforge's kernels with the target's MetaSchedule database, when `intforge tune` made one (the
  tensorized kernels keep their own schedule; tuning covers the rest).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .capture import FloatGraph, short_layer_name
from .errors import IntforgeError
from .latency import layer_program, time_layer_program

VARIANTS = ("plain", "default", "tensorized", "tuned")
BUILD_OPTIONS = {
    "plain": {"dot_kernels": False, "default_schedule": False, "tuned": False},
    "default": {"dot_kernels": False, "default_schedule": True, "tuned": False},
    "tensorized": {"dot_kernels": True, "default_schedule": True, "tuned": False},
    "tuned": {"dot_kernels": True, "default_schedule": True, "tuned": True},
}


def compare_schedules(graph: FloatGraph, target: str = "x86", bits: dict[str, int] | None = None,
                      repeat: int = 10, progress: bool = True) -> list[dict[str, Any]]:
    """One row per conv/linear layer: MACs, and for each schedule its median ms and GOPS (2 ops per MAC)."""
    from .compiler.targets import resolve_target
    from .compiler.tuning import database_dir

    if resolve_target(target).is_cuda:
        raise IntforgeError(f"`schedules` compares CPU schedules (plain, default, tensorized, tuned); '{target}' "
                            "is a GPU, where every conv and dense layer has one schedule, the Tensor Core kernel. "
                            "Time a GPU build with `intforge bench` on the GPU.")

    have_db = (database_dir(target) / "database_tuning_record.json").exists()
    variants = [v for v in VARIANTS if v != "tuned" or have_db]
    layers = [op for op in graph.ops if op.kind in ("conv2d", "linear")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="intforge-sched-") as tmp:
        for i, op in enumerate(layers):
            b = (bits or {}).get(op.name, 8)
            prog = layer_program(op, tuple(graph.shapes[op.inputs[0]]), tuple(graph.shapes[op.output]), b)
            macs = prog.layers()[0]["macs"]
            row: dict[str, Any] = {"name": op.name, "kind": op.kind, "bits": b, "macs": macs, "ms": {}, "gops": {}}
            for v in variants:
                ms = time_layer_program(prog, Path(tmp) / f"{i}-{v}", target, repeat, **BUILD_OPTIONS[v])
                row["ms"][v] = ms
                row["gops"][v] = 2 * macs / (ms * 1e6)
            rows.append(row)
            if progress:
                print(f"\r  schedules: {i + 1}/{len(layers)} layers", end="", flush=True)
    if progress:
        print()
    total = sum(r["ms"]["default"] for r in rows) or 1.0
    for r in rows:
        r["share_of_default"] = r["ms"]["default"] / total
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    variants = [v for v in VARIANTS if rows and v in rows[0]["ms"]]
    head = f"{'layer':28s} {'bits':>4s} {'MMACs':>8s} " + " ".join(f"{v + ' ms':>13s} {v + ' GOPS':>15s}"
                                                                    for v in variants) + f" {'share':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r['ms'][v]:13.3f} {r['gops'][v]:15.2f}" for v in variants)
        lines.append(f"{short_layer_name(r['name'], 28):28s} {r['bits']:4d} {r['macs'] / 1e6:8.2f} {cells} "
                     f"{100 * r['share_of_default']:5.1f}%")
    totals = " ".join(f"{sum(r['ms'][v] for r in rows):13.3f} {'':15s}" for v in variants)
    lines.append(f"{'total':28s} {'':4s} {sum(r['macs'] for r in rows) / 1e6:8.2f} {totals}")
    return "\n".join(lines)


def write_report(rows: list[dict[str, Any]], path: str | Path) -> tuple[Path, Path]:
    """JSON of the rows, and a grouped bar chart (ms per layer per schedule, log scale) beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    variants = [v for v in VARIANTS if rows and v in rows[0]["ms"]]
    fig = Figure(figsize=(max(6.0, 0.5 * len(rows) + 3), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(variants))
    for k, v in enumerate(variants):
        ax.bar([i + k * width for i in range(len(rows))], [r["ms"][v] for r in rows], width, label=v)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["name"] for r in rows], rotation=60,
                  ha="right", fontsize=8)
    ax.set_title("per-layer latency by schedule")
    ax.legend()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    return path, png
