"""4-bit linears rounded to nearest against GPTQ's rounding, on all-MiniLM-L6-v2 (W4A8).

`QuantConfig.int4_rounding="gptq"` (`compile --int4-rounding gptq`) keeps each 4-bit linear's channel
steps (whatever `int4_clip` chose) and picks other integers: column by column, each column's rounding
error moved onto the columns not yet rounded, weighted by the inverse of the calibration inputs' second
moments (`quantize.gptq_round`). This script compiles the trained all-MiniLM-L6-v2 with every linear at
4 bits, and with its 12 FFN linears alone at 4 bits, on 8-bit inputs, each way and with each clip, and
scores the sentence embeddings (mean-pooled over the mask) by their cosine to float's on held-out
snippets, as `bench_text.py` does; each library is checked bit-exact against the reference on a few calls.

Usage: python benchmarks/bench_text_gptq.py [--calib 128] [--test 300] [--out JSON]   (a few minutes)
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
from bench_text import Split, embed, write_result  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--calib", type=int, default=128, help="calibration snippets")
    p.add_argument("--test", type=int, default=300, help="held-out snippets scored")
    p.add_argument("--exact", type=int, default=4, help="calls checked bit-exact against the reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "text_gptq.json")
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

    split = Split(args.calib, args.test, args.tokens)
    cal_ids, cal_mask = split.calibration(args.calib)
    te_ids, te_mask = split.test
    model = zoo.minilm_l6()
    example = (torch.from_numpy(cal_ids[:1]), torch.from_numpy(cal_mask[:1]))
    linears = [op.name for op in capture(model, example).ops if op.kind == "linear"]
    ffn = [n for n in linears if n.endswith("intermediate.dense") or (n.endswith("output.dense")
                                                                     and ".attention." not in n)]

    def float_fn(i: np.ndarray, m: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(i), torch.from_numpy(m)).numpy()

    ref = embed(float_fn, te_ids, te_mask)
    out: dict[str, Any] = {**result_header("text_gptq", args.threads), "model": "all-MiniLM-L6-v2",
                           "tokens": args.tokens, "calibration_snippets": args.calib, "test": args.test}
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for group, four in (("all linears", linears), ("FFN linears", ffn)):
            for clip in ("output", "mse"):
                for rounding in ("nearest", "gptq"):
                    name = f"{group}, {clip} clip, {rounding}"
                    t0 = time.perf_counter()
                    art = intforge.compile(model, example, [cal_ids, cal_mask], output=Path(tmp) / str(len(rows)),
                                           quant=QuantConfig(layer_bits={n: 4 for n in four}, int4_input_bits=8,
                                                             int4_clip=clip, int4_rounding=rounding))
                    seconds = time.perf_counter() - t0
                    lib, program = intforge.load(art.library), IntegerProgram.load(art.program_path)
                    exact = sum(np.array_equal(lib(te_ids[i:i + 1], te_mask[i:i + 1]),
                                               reference.run_float(program, te_ids[i:i + 1], te_mask[i:i + 1])[0])
                                for i in range(args.exact))
                    cos = (embed(lib, te_ids, te_mask) * ref).sum(1)
                    rows[name] = {"layers_at_4": len(four), "int4_clip": clip, "int4_rounding": rounding,
                                  "cosine_mean": float(cos.mean()), "cosine_p1": float(np.percentile(cos, 1)),
                                  "compile_seconds": round(seconds, 1), "bit_exact": f"{exact}/{args.exact}"}
                    print(f"{name:36s} cosine {cos.mean():.4f} (p1 {np.percentile(cos, 1):.4f})  compile "
                          f"{seconds:.0f} s  bit-exact {exact}/{args.exact}", flush=True)
    out["configs"] = rows
    write_result(out, args.out, plot)


def rounding_bars(result: dict[str, Any], path: Path, metric: str, xlabel: str, title: str,
                  height: float = 4.0, xlim: tuple[float, float] | None = None) -> None:
    """A bar a configuration of `result["configs"]`, its `metric`, GPTQ's in red and nearest rounding's in
    grey (this script's plot, and bench_cnn_gptq.py's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["configs"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, height))
    ax.barh(names, [rows[n][metric] for n in names],
            color=["tab:red" if rows[n]["int4_rounding"] == "gptq" else "tab:gray" for n in names])
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(result: dict[str, Any], path: Path) -> None:
    rounding_bars(result, path, "cosine_mean", "embedding cosine to float (mean)",
                  "all-MiniLM-L6-v2, W4A8 linears: nearest vs GPTQ rounding", xlim=(0.7, 1.0))


if __name__ == "__main__":
    main()
