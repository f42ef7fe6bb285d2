"""Layer by layer against ONNX Runtime INT8: which convolutions cost intforge more than ORT, and why.

The whole-model suite (`bench_cpu_suite.py`) says how far apart the two engines are; this script says
where. For each model it
    * profiles ONNX Runtime INT8 (the suite's static QDQ model, 2 threads) with ORT's own profiler over
      `--runs` calls and takes each node's median kernel time, inside the running model;
    * times each intforge INT8 conv/linear layer compiled alone (`intforge.latency.layer_program`: the
      same shapes, NHWC in and out, input resident, requantize epilogue included);
    * matches the two by module name (ORT's node names carry the module path, `/features/features.2/conv/
      conv.0/conv.0.0/Conv` is `features.2.conv.0.0`), and writes one row per layer: both times, their
      ratio, MACs, output count and reduction length K, so the layers intforge loses on can be read off
      by shape; and totals by kind of layer (`by_shape`: 1x1, 3x3 stride 1 and 2, stem, depthwise,
      linear).

Caveats, all in ORT's favour or against it by a few microseconds: ORT's times are measured inside the
model (its caches hold the previous layer's output; its profiler adds ~1-2 us a node); intforge's are a
layer called again and again alone. ORT runs residual adds as their own QLinearAdd nodes (listed apart);
intforge fuses them into the conv before them, and the layer timed here has no add.

Writes JSON (`--out`) and a bar chart beside it; prints the table. About 2 minutes a model on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import quantize_onnx, result_header, set_thread_env  # noqa: E402

from intforge.onnx_import import scope_path  # noqa: E402  (ORT node name -> torch module path)

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2,resnet18")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200, help="profiled ORT calls per model")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per intforge layer (best of 3 medians)")
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "layers_vs_ort.json")
    return p.parse_args(argv)


def ort_node_times(onnx_path: Path, x: np.ndarray, threads: int, runs: int, workdir: Path) -> dict[str, dict]:
    """Median kernel time (ms) of every node of an ORT session, by node name, with its op type."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = True
    so.profile_file_prefix = str(workdir / "ort_profile")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            times[(ev["name"][: -len("_kernel_time")], ev["args"]["op_name"])].append(ev["dur"] / 1e3)
    return {name: {"op": op, "ms": float(np.median(ts)), "calls": len(ts)} for (name, op), ts in times.items()}


def intforge_layer_times(model: Any, shape: tuple[int, ...], repeat: int) -> dict[str, dict]:
    """Each conv/linear layer of `model` compiled alone at INT8 and timed (best of three medians)."""
    import torch
    from bench_cpu_suite import time_layer_alone

    from intforge.capture import capture

    graph = capture(model, (torch.zeros(shape),))
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for op in graph.ops:
            if op.kind not in ("conv2d", "linear"):
                continue
            w = op.params["weight"]
            prog, ms = time_layer_alone(graph, op, Path(tmp), repeat)
            groups = int(op.attrs.get("groups", 1)) if op.kind == "conv2d" else 1
            kind = "depthwise" if groups > 1 and groups == w.shape[0] else op.kind
            out[op.name] = {"kind": kind, "shape_class": shape_class(kind, w.shape, op.attrs.get("stride")),
                            "ms": ms, "macs": prog.layers()[0]["macs"],
                            "outputs": int(np.prod(graph.shapes[op.output])),
                            "k": int(np.prod(w.shape[1:])), "weight_shape": list(w.shape)}
    return out


def shape_class(kind: str, weight_shape: tuple[int, ...], stride) -> str:
    """What a layer is, for the totals: "depthwise", "linear", "stem" (a conv on fewer than 4 input
    channels: the RGB image), else the window and stride ("1x1 stride 1", "3x3 stride 2"), which say which
    intforge kernel runs it (Winograd takes the 3x3 stride-1 convs where it can)."""
    if kind != "conv2d":
        return kind
    if weight_shape[1] < 4:
        return "stem"
    sh = int(stride[0]) if stride is not None else 1
    return f"{weight_shape[2]}x{weight_shape[3]} stride {sh}"


def compare(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from bench_cpu_suite import export_onnx_dynamic

    from intforge import zoo

    torch.manual_seed(0)
    model = getattr(zoo, name)(seed=0).eval()
    images = zoo.random_images(1 + args.calib, seed=0)
    x, calib = np.ascontiguousarray(images[:1]), np.ascontiguousarray(images[1:])
    mdir = work / name
    mdir.mkdir(exist_ok=True)
    export_onnx_dynamic(model, x, mdir / "fp32.onnx")
    int8 = quantize_onnx(mdir / "fp32.onnx", calib, mdir)[0]
    ort_nodes = ort_node_times(int8, x, args.threads, args.runs, mdir)
    ours = intforge_layer_times(model, x.shape, args.repeat)
    rows, others = [], collections.Counter()
    for node, info in ort_nodes.items():
        layer = scope_path(node)
        if info["op"] in ("QLinearConv", "QGemm", "MatMulInteger", "ConvInteger") and layer in ours:
            mine = ours.pop(layer)
            rows.append({"layer": layer, **mine, "ms": round(mine["ms"], 4), "ort_ms": round(info["ms"], 4),
                         "ratio": round(mine["ms"] / info["ms"], 3)})
        else:
            others[info["op"]] += info["ms"]
    res = {"layers": rows, "unmatched_intforge_layers": sorted(ours),
           "ort_other_ops_ms": {k: round(v, 4) for k, v in others.most_common()}}
    for kind in ("conv2d", "depthwise", "linear"):
        res[f"{kind}_total"] = _total([r for r in rows if r["kind"] == kind])
    res["by_shape"] = {}
    for cls in sorted({r["shape_class"] for r in rows}):
        sel = [r for r in rows if r["shape_class"] == cls]
        tot = _total(sel)
        res["by_shape"][cls] = {**tot, "ratio": round(tot["intforge_ms"] / tot["ort_ms"], 3),
                                "ratio_range": [min(r["ratio"] for r in sel), max(r["ratio"] for r in sel)]}
    return res


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The layers' count and their summed intforge and ORT times (ms)."""
    return {"layers": len(rows), "intforge_ms": round(sum(r["ms"] for r in rows), 3),
            "ort_ms": round(sum(r["ort_ms"] for r in rows), 3)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 1, figsize=(14, 3.6 * len(models)), squeeze=False)
    for ax, name in zip(axes[:, 0], models, strict=True):
        rows = result["models"][name]["layers"]
        idx = np.arange(len(rows))
        ax.bar(idx - 0.2, [r["ort_ms"] for r in rows], 0.4, label="ORT INT8 (in model)")
        ax.bar(idx + 0.2, [r["ms"] for r in rows], 0.4, label="intforge INT8 (layer alone)")
        ax.set_xticks(idx, [f"{r['layer']} K{r['k']}" for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel("ms")
        ax.set_title(f"{name}: per-layer latency, batch 1, {result['threads']} threads")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_thread_env(args.threads)
    t0 = time.time()
    result: dict[str, Any] = {**result_header("layers_vs_ort", args.threads), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            res = compare(name, args, Path(tmp))
            result["models"][name] = res
            print(f"{name}: intforge layer alone vs ORT INT8 node (ms), worst ratios first")
            for r in sorted(res["layers"], key=lambda r: -r["ratio"]):
                print(f"  {r['layer']:28s} {r['kind']:9s} K={r['k']:5d} out={r['outputs']:8d} "
                      f"{r['ms']:8.4f} {r['ort_ms']:8.4f} {r['ratio']:6.2f}x")
            for kind in ("conv2d", "depthwise", "linear"):
                tot = res[f"{kind}_total"]
                print(f"  total {kind:9s} intforge {tot['intforge_ms']:.3f} ms, ORT {tot['ort_ms']:.3f} ms "
                      f"({tot['layers']} layers)")
            for cls, tot in res["by_shape"].items():
                print(f"  {cls:13s} {tot['layers']:3d} layers: intforge {tot['intforge_ms']:.3f} ms, ORT "
                      f"{tot['ort_ms']:.3f} ms ({tot['ratio']:.2f}x; {tot['ratio_range'][0]:.2f}-"
                      f"{tot['ratio_range'][1]:.2f}x a layer)")
            print(f"  ORT's other ops: {res['ort_other_ops_ms']}", flush=True)
    result["total_seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
