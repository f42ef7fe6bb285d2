"""ResNet18 latency on CPU: intforge INT8 against PyTorch FP32, ONNX Runtime FP32 and ONNX Runtime INT8.

What it measures
    Batch-1, 224x224 single-image latency of torchvision's ResNet18 (random, seeded weights from
    `intforge.zoo`) through four engines, all in ONE process on the same machine with the same thread
    count:

    * ``intforge_int8``  the integer-only model.so built by ``intforge.compile`` (default, untuned schedule),
    * ``torch_fp32``     PyTorch eager under ``torch.inference_mode``,
    * ``ort_fp32``       ONNX Runtime on the ``torch.onnx.export`` of the same model,
    * ``ort_int8``       ONNX Runtime on that ONNX file quantized statically (QDQ, per-channel int8 weights,
                         uint8 activations, MinMax calibration on the same images intforge calibrates on).

    Every engine goes through the same timing loop (warmup calls, then `--repeat` timed calls with
    ``time.perf_counter``, each on the same input image and including the engine's own input/output
    conversion) and reports median, min and p90 milliseconds. Each engine's top-1 prediction is also
    compared with PyTorch FP32's on the calibration images (fraction of equal argmax) so a fast but broken
    engine cannot pass unnoticed.

Why
    intforge's claim is integer-only inference that is bit-exact against its own reference; this script
    puts a number on what that costs in speed today next to the float and quantized baselines a user would
    otherwise deploy. ONNX Runtime's static INT8 is the closest off-the-shelf comparison (it, too, is a
    post-training quantization calibrated on sample data), so the JSON records the ratio
    ``intforge_int8 / ort_int8``. No engine is tuned: intforge's schedule is TVM's default one, so expect it
    to be several times slower; the numbers are reported as measured.

Output: a JSON file (`--out`) with machine info, versions, settings and per-engine results, a bar chart
PNG next to it (same stem), and a short table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ENGINES: tuple[str, ...] = ("intforge_int8", "torch_fp32", "ort_fp32", "ort_int8")
ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine (default 2)")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per engine (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per engine before timing (default 5)")
    p.add_argument("--calib", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's weights and the images (default 0)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "resnet18.json",
                   help="JSON result path; the chart is written beside it as .png")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the built artifacts (model.so, .onnx files) here instead of a temp directory")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeat < 1 or args.warmup < 0 or args.calib < 1:
        p.error("--threads, --repeat and --calib must be >= 1 and --warmup >= 0")
    return args


def set_thread_env(threads: int) -> None:
    """Thread counts read at import time (TVM's pool, OpenMP); must run before tvm/torch are imported."""
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(threads)


# --------------------------------------------------------------------------------------------- helpers


def machine_info() -> dict[str, Any]:
    model, phys = "unknown", set()
    try:
        cur: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "physical id" in cur and "core id" in cur:
                    phys.add((cur["physical id"], cur["core id"]))
                cur = {}
                continue
            key, _, val = line.partition(":")
            cur[key.strip()] = val.strip()
            if key.strip() == "model name" and model == "unknown":
                model = val.strip()
    except OSError:
        pass
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": len(phys) or None,
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def timing_stats(ts: list[float], warmup: int, load: float | None) -> dict[str, Any]:
    """What every timing loop reports for an engine's timed calls (ms)."""
    return {"median_ms": round(statistics.median(ts), 3), "min_ms": round(min(ts), 3),
            "p90_ms": round(float(np.percentile(ts, 90)), 3), "repeat": len(ts), "warmup": warmup,
            "other_cpu_load": load}


def time_engine(fn: Callable[[np.ndarray], Any], x: np.ndarray, repeat: int, warmup: int) -> dict[str, Any]:
    """The one timing loop every engine goes through: warmup, then `repeat` timed calls on `x`."""
    for _ in range(warmup):
        fn(x)
    ts: list[float] = []
    ticks = cpu_ticks()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return timing_stats(ts, warmup, other_cpu_load(ticks, cpu_ticks()))


def time_interleaved(fns: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, repeat: int, warmup: int,
                     rounds: int = 5, before: Callable[[], Any] | None = None,
                     each_round: Callable[[], Any] | None = None) -> dict[str, dict[str, Any]]:
    """`time_engine` for several engines at once, round by round: each round times a block of
    repeat / rounds calls of every engine in turn, so a slow phase of a shared machine (this VM's
    timings are bimodal over tens of seconds) lands on every engine alike instead of on whichever
    engine's turn it was. Each block starts with one untimed call, which refills the caches and lets the
    previous engine's idle threads (ORT's and OpenMP's spin a while) go to sleep. Statistics pool all of
    an engine's timed calls; `round_medians_ms` keeps each round's median, so that two engines can be
    compared round by round (`paired_ratio`). `before`, if given, runs before every timed call, outside
    its time (`bench_contention.py`: evict the caches); `each_round`, at the start of every round, also
    untimed (`bench_cpu_suite.py`: probe whether the two vCPUs run on cores of their own)."""
    from intforge.peers import settle  # (imported here: the caller sets the thread variables before intforge)

    per_round = max(1, -(-repeat // rounds))
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    ticks = cpu_ticks()
    for _ in range(rounds):
        if each_round is not None:  # (after a pause: the engines' idle threads spin a while)
            settle()
            each_round()
        for name, fn in fns.items():
            settle()
            fn(x)
            for _ in range(per_round):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fn(x)
                ts[name].append((time.perf_counter() - t0) * 1e3)
    load = other_cpu_load(ticks, cpu_ticks())
    return {name: {**timing_stats(t, warmup, load), "rounds": rounds, "round_medians_ms": [
        round(statistics.median(t[r * per_round:(r + 1) * per_round]), 3) for r in range(rounds)]}
        for name, t in ts.items()}


def paired_ratio(a: dict[str, Any], b: dict[str, Any], rounds: list[int] | None = None) -> float | None:
    """The median over rounds of engine a's round median / engine b's (both from one `time_interleaved`):
    each round's two blocks ran seconds apart, so a slow phase of the machine that spans a round divides
    out, where the ratio of the two overall medians keeps whatever the phases did to each. `rounds`: only
    those rounds (indices); None when it names none."""
    ra, rb = a.get("round_medians_ms"), b.get("round_medians_ms")
    if not ra or not rb or len(ra) != len(rb):
        return None
    pairs = list(zip(ra, rb, strict=True))
    if rounds is not None:
        pairs = [pairs[r] for r in rounds]
    return round(statistics.median(x / y for x, y in pairs), 3) if pairs else None


def predict_all(fn: Callable[[np.ndarray], Any], images: np.ndarray) -> np.ndarray:
    """Logits for each image, one batch-1 call at a time: (N, classes)."""
    return np.concatenate([np.asarray(fn(images[i:i + 1])).reshape(1, -1) for i in range(len(images))])


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Top-1 agreement with the reference, plus finer measures that a model predicting one class for
    most images cannot saturate: mean top-5 set overlap and logit cosine / max abs diff."""
    a, b = logits.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    top5a, top5b = np.argsort(-a, 1)[:, :5], np.argsort(-b, 1)[:, :5]
    overlap = [len(set(u) & set(v)) / 5 for u, v in zip(top5a, top5b, strict=True)]
    return {"top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "top5_overlap": round(float(np.mean(overlap)), 4),
            "mean_cosine": round(float(cos.mean()), 6),
            "max_abs_diff": round(float(np.abs(a - b).max()), 6)}


def cpu_ticks() -> tuple[int, int, int] | None:
    """(machine busy, machine total, this process's own) CPU ticks from /proc; None off Linux.

    Busy includes steal (time a hypervisor gave to other guests), since it, too, is time the engines lost."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = f
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, sum(f), int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def other_cpu_load(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> float | None:
    """Fraction of the machine's CPU capacity used by anything but this process between two cpu_ticks().

    Near 0 means the engines had the machine to themselves; a large value means the timings are inflated."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before, strict=True))
    return round(max(0.0, (busy - own) / total), 3)


# --------------------------------------------------------------------------------------------- engines


def build_intforge(model: Any, images: np.ndarray, calib: np.ndarray, workdir: Path) -> tuple[Any, dict]:
    import torch

    import intforge
    import intforge.compiler  # noqa: F401 - the build backend, imported as documented

    t0 = time.perf_counter()
    art = intforge.compile(model, (torch.from_numpy(images[:1]),), calib, output=workdir / "intforge")
    compile_s = time.perf_counter() - t0
    m = intforge.load(art.library)
    info = {"compile_seconds": round(compile_s, 2), "build_seconds": art.manifest.get("build_seconds"),
            "target": art.manifest.get("target"), "calibration": "minmax",
            "note": "default (untuned) TVM schedule; timings include numpy<->tvm tensor conversion"}
    return m, info


def build_torch(model: Any, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    import torch

    torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run, {"mode": "eager, torch.inference_mode", "torch_threads": torch.get_num_threads()}


def export_onnx(model: Any, x: np.ndarray, path: Path) -> dict:
    import warnings

    import torch

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its deprecation
        torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    return {"exporter": "torch.onnx.export(dynamo=False)", "opset": 17,
            "export_seconds": round(time.perf_counter() - t0, 2)}


def quantize_onnx(fp32_path: Path, calib: np.ndarray, workdir: Path) -> tuple[Path, dict]:
    """ORT's static INT8 of the file (intforge.peers: QDQ, per-channel, u8 activations, min/max)."""
    from intforge.peers import ort_quantize_static

    out, info = ort_quantize_static(fp32_path, calib, workdir / "resnet18_int8_qdq.onnx")
    info["calibration_images"] = info.pop("calibration_samples")
    return out, info


def ort_session(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    from intforge.peers import ort_session as session

    return session(path, threads)


# --------------------------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import tvm

    import intforge

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "tvm": tvm.__version__, "intforge": intforge.__version__, "numpy": np.__version__}


def result_header(benchmark: str, threads: int) -> dict[str, Any]:
    """The fields every benchmark JSON starts with: what ran, when, where, with which versions."""
    return {"benchmark": benchmark, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "machine": machine_info(), "versions": versions(), "threads": threads}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = result["engines"]
    names = list(eng)
    med = [eng[n]["median_ms"] for n in names]
    lo = [eng[n]["median_ms"] - eng[n]["min_ms"] for n in names]
    hi = [eng[n]["p90_ms"] - eng[n]["median_ms"] for n in names]
    colors = {"intforge_int8": "tab:red", "torch_fp32": "tab:blue", "ort_fp32": "tab:green",
              "ort_int8": "tab:olive"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=5, color=[colors.get(n, "gray") for n in names])
    for b, v in zip(bars, med, strict=True):
        ax.annotate(f"{v:.1f} ms", (b.get_x() + b.get_width() / 2, v), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)
    m = result["machine"]
    ax.set_ylabel("latency, ms (bar: median, whiskers: min..p90)")
    ax.set_title(f"ResNet18, batch {result['batch']}, 224x224, {result['threads']} thread(s)\n"
                 f"{m['cpu_model']}", fontsize=10)
    ax.set_ylim(0, max(eng[n]["p90_ms"] for n in names) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    print(f"\nResNet18 batch {result['batch']} 224x224, {result['threads']} thread(s), "
          f"{result['machine']['cpu_model']}")
    print(f"{'engine':<15}{'median ms':>11}{'min ms':>9}{'p90 ms':>9}{'top1 vs fp32':>14}{'top5 overlap':>14}")
    for name, r in result["engines"].items():
        print(f"{name:<15}{r['median_ms']:>11.2f}{r['min_ms']:>9.2f}{r['p90_ms']:>9.2f}"
              f"{r['top1_agreement_vs_torch_fp32']:>14.3f}{r['top5_overlap_vs_torch_fp32']:>14.3f}")
    print(f"intforge_int8 / ort_int8 (median): {result['ratio_intforge_int8_over_ort_int8']:.2f}x")


# --------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import torch

    from intforge import zoo

    # zoo.resnet18(seed) seeds only the BatchNorm statistics; torchvision initialises the conv/fc weights
    # from torch's global generator, so seed that too or every run benchmarks a different network.
    torch.manual_seed(args.seed)
    model = zoo.resnet18(seed=args.seed)
    images = zoo.random_images(args.calib + 1, seed=args.seed)  # image 0: example + timing input; rest: calib
    x, calib = np.ascontiguousarray(images[:1]), np.ascontiguousarray(images[1:])

    print(f"[1/4] intforge compile (calibration on {len(calib)} images)...", flush=True)
    if_model, if_info = build_intforge(model, images, calib, workdir)
    torch_fn, torch_info = build_torch(model, args.threads)
    print("[2/4] ONNX export + ONNX Runtime static INT8 quantization...", flush=True)
    fp32_path = workdir / "resnet18_fp32.onnx"
    onnx_info = export_onnx(model, x, fp32_path)
    int8_path, q_info = quantize_onnx(fp32_path, calib, workdir)

    fns: dict[str, Callable[[np.ndarray], Any]] = {
        "intforge_int8": if_model, "torch_fp32": torch_fn,
        "ort_fp32": ort_session(fp32_path, args.threads), "ort_int8": ort_session(int8_path, args.threads),
    }
    details = {"intforge_int8": if_info, "torch_fp32": torch_info, "ort_fp32": onnx_info,
               "ort_int8": {**onnx_info, **q_info}}

    print("[3/4] accuracy vs PyTorch FP32 on the calibration images...", flush=True)
    ref = predict_all(torch_fn, calib)
    engines: dict[str, dict[str, Any]] = {}
    for name in ENGINES:
        agree = agreement(predict_all(fns[name], calib), ref)
        engines[name] = {"top1_agreement_vs_torch_fp32": agree["top1_agreement"],
                         "top5_overlap_vs_torch_fp32": agree["top5_overlap"],
                         "logits_mean_cosine_vs_torch_fp32": agree["mean_cosine"],
                         "logits_max_abs_diff_vs_torch_fp32": agree["max_abs_diff"]}

    classes, counts = np.unique(ref.argmax(1), return_counts=True)
    ref_classes = {int(c): int(n) for c, n in zip(classes, counts, strict=True)}

    print(f"[4/4] timing ({args.warmup} warmup + {args.repeat} timed calls per engine)...", flush=True)
    for name in ENGINES:
        t = time_engine(fns[name], x, args.repeat, args.warmup)
        engines[name] = {**t, **engines[name], "details": details[name]}
        busy = "" if t["other_cpu_load"] is None else f"  (other processes: {t['other_cpu_load']:.0%} CPU)"
        print(f"      {name:<14} median {t['median_ms']:.2f} ms{busy}", flush=True)
    loads = [e["other_cpu_load"] for e in engines.values() if e["other_cpu_load"] is not None]
    if loads and max(loads) > 0.05:
        print(f"      warning: other processes used up to {max(loads):.0%} of the CPU while timing; "
              "the latencies are inflated, rerun on an idle machine", flush=True)

    return {
        "benchmark": "resnet18 latency, batch 1, 224x224, CPU",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "versions": versions(),
        "threads": args.threads,
        "thread_env": {k: os.environ.get(k) for k in ("TVM_NUM_THREADS", "TVM_BIND_THREADS", "OMP_NUM_THREADS")},
        "batch": 1,
        "input_shape": list(x.shape),
        "seed": args.seed,
        "model": f"torchvision resnet18, random weights (torch.manual_seed({args.seed}); "
                 f"intforge.zoo.resnet18(seed={args.seed})), eval mode",
        "images": f"intforge.zoo.random_images({len(images)}, seed={args.seed}): image 0 is the timing input, "
                  f"images 1..{len(images) - 1} calibrate both INT8 engines and score top-1 agreement",
        "timing": "same loop for every engine: warmup calls, then repeat timed calls (time.perf_counter) "
                  "on the same batch-1 numpy input, engine I/O conversion included",
        "other_cpu_load_note": "per engine: fraction of the machine's CPU used by other processes (and "
                               "hypervisor steal) during its timed calls; near 0 = uncontended",
        "agreement_reference": {
            "torch_fp32_top1_class_counts": ref_classes,
            "note": "random weights and synthetic images: PyTorch FP32 puts most images in few classes, so "
                    "top-1 agreement is a coarse check; top-5 overlap and logit cosine are finer",
        },
        "engines": engines,
        "ratio_intforge_int8_over_ort_int8": round(
            engines["intforge_int8"]["median_ms"] / engines["ort_int8"]["median_ms"], 3),
        "ratio_basis": "median_ms",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_thread_env(args.threads)  # before the first `import tvm` (inside intforge) and torch
    t0 = time.perf_counter()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_resnet18_") as tmp:
            result = run(args, Path(tmp))
    result["total_seconds"] = round(time.perf_counter() - t0, 1)

    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(result, png)
    print_table(result)
    print(f"wrote {out} and {png} ({result['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
