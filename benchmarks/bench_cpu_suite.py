"""CPU latency suite: ResNet18, ResNet50 and MobileNetV2 at batch 1 and 8, every engine in one run.

Engines, all timed in ONE process on the same machine with the same thread count (default 2):
    torch_fp32      PyTorch eager, torch.inference_mode
    ort_fp32        ONNX Runtime on torch.onnx.export of the model
    ort_int8        ONNX Runtime, static QDQ INT8 (per-channel s8 weights, u8 activations, MinMax)
    tvm_fp32        TVM Relax from torch.export, compiled with TVM's default CPU pipeline (untuned, the
                    out-of-the-box TVM a user gets without tuning)
    intforge_int8   intforge's integer-only model.so (VNNI kernels on AVX512-VNNI CPUs)
    intforge_mixed  the same with a mixed INT4/INT8 plan: Hessian traces (block probes, no eigenvalues)
                    on the calibration images with the float model's predictions as labels, ILP at 50%
                    of the size range, first/last layer pinned to INT8, residual branches tied

Models are torchvision's with random seeded weights (`intforge.zoo`): latency does not depend on the
weights' values, and no ImageNet data is reachable here. The timing loops are bench_resnet18.py's
(warm-up, then `--repeat` perf_counter calls on the same input, engine I/O conversion included). All
engines but TVM FP32 are timed side by side in `--rounds` rounds (`time_interleaved`): this VM has slow
phases of tens of seconds, which used to land on one engine and skew its ratio by up to 1.7x.

It also reports the achieved fraction of the CPU's INT8 peak: for the largest convolutions of each model
(MACs of the layer / its time alone, intforge's kernel, batch 1; timed in a fresh `--peak-only` process
after the latency runs), and for whole models (each INT8 engine's
MACs / latency, and the rate that 0.75x ORT INT8's latency would take). The peak is measured
(`vnni_peak.c`: register-only vpdpbusd on every thread, at whatever clock the CPU boosts to); the nominal
one (MACs per cycle per core for the CPU's family x cores x /proc/cpuinfo's base clock) is recorded beside
it. Before and after the latency runs it records `thread_skew.c`'s reading of how unevenly the CPUs run
(what a statically split kernel loses to its slower thread), so a run says how noisy its minutes were,
and before every round of the side-by-side timing (2 threads) whether the two vCPUs had a core's
dot-product units each (`CoreProbe`): the intforge/ORT INT8 ratio is also given over the rounds on cores
apart and over the others, where the host ran the two vCPUs on shared units.

Writes JSON (`--out`) and a grouped bar chart beside it. Takes 10-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_resnet18 import (  # noqa: E402 - the shared timing loop and engines
    machine_info,
    ort_session,
    paired_ratio,
    quantize_onnx,
    set_thread_env,
    time_engine,
    time_interleaved,
    versions,
)

ROOT = Path(__file__).resolve().parent
MODELS = ("resnet18", "resnet50", "mobilenet_v2")
ENGINES = ("torch_fp32", "ort_fp32", "ort_int8", "tvm_fp32", "intforge_int8", "intforge_mixed")
# int8 MACs a cycle a core: one 64-MAC vpdpbusd (Zen 4, 512-bit ops on 256-bit units), or two (Zen 5,
# family 26, with full 512-bit units: vnni_peak.c measures 968-1031 GMAC/s on 2 cores at ~3.8-4.0 GHz)
MACS_PER_CYCLE_PER_CORE = 64
MACS_PER_CYCLE_BY_FAMILY = {("AuthenticAMD", "26"): 128}  # (vendor_id, cpu family) as /proc/cpuinfo says
# AVX2 without VNNI: two 256-bit vpmaddwd a cycle, 16 exact int8 MACs each (Zen 2/3, Skylake)
AVX2_MACS_PER_CYCLE = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10,
                   help="engines are timed in turn, this many rounds of repeat/rounds calls each")
    p.add_argument("--calib", type=int, default=16)
    p.add_argument("--top-convs", type=int, default=3, help="largest convolutions per model for the peak fraction")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "cpu_suite.json")
    p.add_argument("--peak-only", action="store_true",
                   help="recompute only the largest convolutions' peak fractions into the existing --out JSON")
    return p.parse_args(argv)


def cpu_ghz() -> float:
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("cpu MHz")]
    return max(mhz) / 1e3 if mhz else float("nan")


def macs_per_cycle() -> int:
    """int8 MACs a cycle a core for this CPU (MACS_PER_CYCLE_BY_FAMILY, else MACS_PER_CYCLE_PER_CORE; on
    AVX2 without VNNI, AVX2_MACS_PER_CYCLE)."""
    tool = peak_tool()
    if tool is not None and tool[0] == "avx2_peak.c":
        return AVX2_MACS_PER_CYCLE
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return MACS_PER_CYCLE_BY_FAMILY.get((info.get("vendor_id"), info.get("cpu family")), MACS_PER_CYCLE_PER_CORE)


def nominal_int8_peak(threads: int) -> float:
    """GMAC/s from the spec sheet's arithmetic: MACs per cycle x cores x /proc/cpuinfo's clock."""
    return macs_per_cycle() * threads * cpu_ghz()


VNNI_PEAK_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vnni")
AVX2_PEAK_FLAGS = ("-mavx2",)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them."""
    return set(" ".join(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split())


def peak_tool() -> tuple[str, tuple[str, ...]] | None:
    """The register-only INT8 loop of the instruction intforge's kernels run on this CPU (source, flags):
    vpdpbusd with AVX512-VNNI (vnni_peak.c), else vpmaddwd + vpaddd with AVX2 (avx2_peak.c: the exact
    int16 products of kernels/x86_avx2.py); None on neither."""
    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "vnni_peak.c", VNNI_PEAK_FLAGS
    if "avx2" in flags:
        return "avx2_peak.c", AVX2_PEAK_FLAGS
    return None
_TOOLS = tempfile.TemporaryDirectory(prefix="intforge_c_tools_")  # the built C tools, for this process


@functools.cache
def _built_c_tool(source: str, flags: tuple[str, ...]) -> Path | None:
    """benchmarks/`source` built once with the system C compiler: the executable, or None without a
    compiler or where it does not build."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = Path(_TOOLS.name) / Path(source).stem
    try:
        subprocess.run([cc, "-O2", *flags, "-pthread", str(ROOT / source), "-o", str(exe)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, OSError):
        return None
    return exe


def _c_tool(source: str, flags: tuple[str, ...], args: list[str], runs: int = 1) -> list[str] | None:
    """Run benchmarks/`source` (`_built_c_tool`) `runs` times with `args`: each run's stdout. None without
    a compiler, or where it does not build (no AVX512-VNNI) or fails to run."""
    import subprocess

    exe = _built_c_tool(source, flags)
    if exe is None:
        return None
    try:
        return [subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout
                for _ in range(runs)]
    except (subprocess.CalledProcessError, OSError):
        return None


def measured_int8_peak(threads: int) -> float | None:
    """GMAC/s of `threads` threads issuing register-only vpdpbusd (vnni_peak.c), or on AVX2 vpmaddwd
    (avx2_peak.c; `peak_tool`): the rate the dot-product units reach at the clock the CPU really runs at.
    None without a C compiler or either instruction set."""
    tool = peak_tool()
    runs = _c_tool(*tool, [str(threads)], runs=3) if tool else None
    try:
        return max(float(out) for out in runs) if runs else None
    except ValueError:
        return None


def measured_amx_peak(threads: int) -> float | None:
    """GMAC/s of `threads` (1 or 2) threads issuing register-only `tdpbusd` (amx_peak.c), where the CPU has
    AMX-INT8 and Linux grants its tile data: the unit intforge's 1x1 convs and linears run on there
    (kernels/x86_amx.py). None elsewhere."""
    if "amx_int8" not in cpu_flags() or threads not in (1, 2):
        return None
    runs = _c_tool("amx_peak.c", ("-mamx-tile", "-mamx-int8"), [])
    try:
        found = json.loads(runs[0]) if runs else {}
    except ValueError:
        return None
    return found.get(f"gmacs_{threads}t") if found.get("amx") and found.get("tile_product_bitexact") else None


def on_tiles(op: Any, in_shape: tuple[int, ...]) -> bool:
    """Whether intforge's x86 build runs conv `op` (input NCHW `in_shape`) on AMX's tile kernel here."""
    from intforge.compiler import resolve_target
    from intforge.compiler.build import amx_kernels
    from intforge.kernels import x86_amx

    o, c, kh, kw = op.params["weight"].shape
    stride, padding, dilation = (tuple(op.attrs.get(key, (d, d))) for key, d in
                                 (("stride", 1), ("padding", 0), ("dilation", 1)))
    if int(op.attrs.get("groups", 1)) != 1 or not amx_kernels(resolve_target("x86")):
        return False
    if (kh, kw) != (1, 1):  # a windowed conv (x86_amx.conv2d_amx)
        nhwc = (in_shape[0], in_shape[2], in_shape[3], in_shape[1])
        return x86_amx.conv_supported(nhwc, o, (kh, kw), stride, padding, dilation, "uint8")
    return stride == (1, 1) and x86_amx.supported(in_shape[0] * in_shape[2] * in_shape[3], c, o, "uint8")


# Two threads of register-only vpdpbusd run this many times one thread's rate, or more, on two cores of
# their own: the probes of 2026-12-05 read 1.8-2.0 then, and 1.0-1.6 when the host ran the two vCPUs on
# one core's dot-product units (or beside a neighbour's on both), in 19 of 300 rounds that morning.
CORES_APART = 1.7


class CoreProbe:
    """Whether this VM's two vCPUs have a core's dot-product units each right now: vnni_peak.c's rate on 2
    threads over its rate on 1 (about 2 on two free cores; 1 where both share one core's units), built
    once per process and run before every round of the side-by-side timing (about 50 ms). On a shared
    host the vCPUs' placement changes for seconds at a time, and a kernel that keeps the units busy could lose
    more then than one that leaves them idle part of the time: the suite reports the paired ratio over
    the rounds on cores apart and over the others (`split_by_cores`), so that the two can be told apart.
    (On 2026-12-05 most slow rounds had the cores apart: README, Benchmarks.)"""

    def __init__(self) -> None:
        self.readings: list[float | None] = []
        self.one_thread_gmacs: list[float | None] = []  # the clock's share: a slower clock, a lower rate
        self.tool = peak_tool()  # (vpmaddwd's units on AVX2 CPUs)
        self.exe = _built_c_tool(*self.tool) if self.tool and len(os.sched_getaffinity(0)) >= 2 else None

    def __call__(self) -> None:
        runs = [_c_tool(*self.tool, [str(n)]) for n in (1, 2)] if self.exe else [None, None]
        try:
            one, two = (float(r[0]) if r else None for r in runs)
        except ValueError:
            one = two = None
        self.readings.append(round(two / one, 3) if one and two else None)
        self.one_thread_gmacs.append(one)


def split_by_cores(res: dict[str, Any], readings: list[float | None]) -> dict[str, Any] | None:
    """intforge INT8 / ORT INT8 round by round, over the rounds whose probe (`CoreProbe`) found the two
    vCPUs on cores apart and over the others."""
    if not readings or any(r is None for r in readings) or "round_medians_ms" not in res.get("ort_int8", {}) \
            or "round_medians_ms" not in res.get("intforge_int8", {}):
        return None
    apart = [i for i, r in enumerate(readings) if r >= CORES_APART]
    shared = [i for i, r in enumerate(readings) if r < CORES_APART]
    a, b = res["intforge_int8"], res["ort_int8"]
    return {"cores_apart_at_or_above": CORES_APART, "rounds_apart": len(apart), "rounds_shared": len(shared),
            "paired_ratio_apart": paired_ratio(a, b, apart), "paired_ratio_shared": paired_ratio(a, b, shared)}


def thread_skew() -> dict[str, Any] | None:
    """thread_skew.c's reading of how unevenly the CPUs run right now (`static_loss`: what a statically
    split kernel loses to its slower thread), so that a run's JSON says how noisy its minutes were: on
    `vpdpbusd` with AVX512-VNNI, else on AVX2's `vpmaddwd` (`peak_tool`). None without a C compiler, either
    instruction set or a second CPU."""
    tool = peak_tool()
    if len(os.sched_getaffinity(0)) < 2 or tool is None:
        return None
    runs = _c_tool("thread_skew.c", tool[1], [])
    try:
        return json.loads(runs[0]) if runs else None
    except ValueError:
        return None


def export_onnx_dynamic(model: Any, x: np.ndarray, path: Path) -> None:
    """ONNX with a dynamic batch axis: ORT's calibration feeds single images to the batch-8 model too."""
    import torch

    from intforge.peers import export_for_ort

    export_for_ort(model, torch.from_numpy(x[:1]), path)


def build_tvm_fp32(model: Any, x: np.ndarray):
    import torch
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from intforge.compiler.targets import resolve_target

    with torch.no_grad():
        ep = torch.export.export(model, (torch.from_numpy(x),))
    mod = from_exported_program(ep, keep_params_as_input=False)
    ex = tvm.compile(mod, target=resolve_target("x86").tvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())

    def run(a: np.ndarray) -> np.ndarray:
        out = vm["main"](tvm.runtime.tensor(a))
        out = out[0] if not hasattr(out, "numpy") else out
        return out.numpy()

    return run


def mixed_bits(model: Any, calib: np.ndarray) -> dict[str, int]:
    import torch

    from intforge.bitplan import plan_layers, residual_ties
    from intforge.capture import capture
    from intforge.hessian import analyze
    from intforge.planner import Budget, plan

    x = torch.from_numpy(calib[:8])
    with torch.no_grad():
        y = model(x).argmax(1)
    report = analyze(model, [(x, y)], tol=0.1, max_probes=10, power_iters=0, probe="block", progress=False)
    graph = capture(model, (x[:1],))
    layers = plan_layers(graph, report)
    return plan(layers, budgets=[Budget("size", 0.5, relative=True)], tie=residual_ties(graph),
                pin_first_last=True).bits


def time_layer_alone(graph: Any, op: Any, workdir: Path, repeat: int = 30) -> tuple[Any, float]:
    """Layer `op` of `graph` compiled alone at INT8 with intforge's kernels: its one-layer program and its
    time in ms, the best of three medians of `repeat` runs (on a shared machine noise only adds time)."""
    from intforge.latency import layer_program, time_layer_program

    prog = layer_program(op, tuple(graph.shapes[op.inputs[0]]), tuple(graph.shapes[op.output]), 8)
    ms = min(time_layer_program(prog, workdir / f"{op.name}_{k}", "x86", repeat, tuned=False) for k in range(3))
    return prog, ms


def peak_fraction(model: Any, shape: tuple[int, ...], top: int, threads: int,
                  peak_gmacs: float, amx_gmacs: float | None = None) -> list[dict[str, Any]]:
    """The largest convolutions, each compiled alone with intforge's kernels and timed; where one runs on
    AMX's tiles (`on_tiles`), also as a fraction of their peak `amx_gmacs`, and with `amx_gmacs` the
    largest of those too where none of the `top` is one."""
    import torch

    from intforge.capture import capture

    graph = capture(model, (torch.zeros(shape),))
    def size(op: Any) -> int:
        return int(np.prod(op.params["weight"].shape)) * int(np.prod(graph.shapes[op.output][2:]))

    convs = sorted((op for op in graph.ops if op.kind == "conv2d"), key=lambda op: -size(op))
    peak = peak_gmacs * 1e9
    rows, seen = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for op in convs:
            key = (tuple(op.params["weight"].shape), tuple(graph.shapes[op.inputs[0]]), str(op.attrs.get("stride")))
            tiles = bool(amx_gmacs) and on_tiles(op, tuple(graph.shapes[op.inputs[0]]))
            if key in seen or (len(rows) >= top and not tiles):
                continue
            seen.add(key)
            prog, ms = time_layer_alone(graph, op, Path(tmp))
            macs = prog.layers()[0]["macs"]
            rows.append({"layer": op.name, "weight_shape": list(op.params["weight"].shape),
                         "output_shape": list(graph.shapes[op.output]), "macs": macs, "ms": round(ms, 4),
                         "gmacs_per_s": round(macs / ms / 1e6, 2),
                         "fraction_of_int8_peak": round(macs / ms * 1e3 / peak, 4)})
            if tiles:
                rows[-1].update({"instruction": "tdpbusd (AMX)",
                                 "fraction_of_amx_peak": round(macs / ms / 1e6 / amx_gmacs, 4)})
            if len(rows) >= top and (not amx_gmacs or any("instruction" in r for r in rows)):
                break
    return rows


def run_model(name: str, batch: int, args: argparse.Namespace, engines: list[str], work: Path) -> dict[str, Any]:
    import torch

    import intforge
    from intforge import zoo
    from intforge.compiler import build
    from intforge.quantize import QuantConfig

    torch.manual_seed(0)
    model = getattr(zoo, name)(seed=0).eval()
    images = zoo.random_images(max(args.calib, batch) + batch, seed=0)
    x = np.ascontiguousarray(images[:batch])
    calib = np.ascontiguousarray(images[batch:batch + args.calib])
    res: dict[str, Any] = {}
    fns: dict[str, Any] = {}
    for eng in engines:
        t0 = time.perf_counter()
        try:
            if eng == "torch_fp32":
                def _torch(a: np.ndarray) -> np.ndarray:
                    with torch.inference_mode():
                        return model(torch.from_numpy(a)).numpy()
                fns[eng] = _torch
            elif eng in ("ort_fp32", "ort_int8"):
                mdir = work / name  # one export and one quantization per model, for every batch size
                mdir.mkdir(exist_ok=True)
                fp32, int8 = mdir / "fp32.onnx", mdir / "resnet18_int8_qdq.onnx"  # the name quantize_onnx writes
                if not fp32.exists():
                    export_onnx_dynamic(model, x, fp32)
                if eng == "ort_int8" and not int8.exists():
                    int8 = quantize_onnx(fp32, calib, mdir)[0]
                fns[eng] = ort_session(fp32 if eng == "ort_fp32" else int8, args.threads)
            elif eng == "tvm_fp32":
                fns[eng] = build_tvm_fp32(model, x)
            elif eng in ("intforge_int8", "intforge_mixed"):
                bits = mixed_bits(model, calib) if eng == "intforge_mixed" else {}
                program, _ = intforge.quantize_model(model, (torch.from_numpy(x),), calib,
                                                     quant=QuantConfig(layer_bits=bits))
                art = build(program, work / f"{name}_b{batch}_{eng}", tuned=False)
                res["macs"] = sum(layer["macs"] for layer in program.layers())
                res.setdefault("details", {})[eng] = {
                    "int4_layers": sum(b == 4 for b in bits.values()), "weight_bytes": art.manifest["weight_bytes"]}
                fns[eng] = intforge.load(art.library)
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            res[eng] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"    {eng}: FAILED {res[eng]['error']}", flush=True)
            continue
        res[eng] = {"setup_seconds": round(time.perf_counter() - t0, 1)}
    # TVM FP32 (seconds a call: repeat / 10 calls) alone, then the others side by side, round by round
    # (`time_interleaved`; 10 rounds of 4 calls: the VM's slow phases last seconds, so many short blocks)
    timed = {}
    if "tvm_fp32" in fns:
        timed["tvm_fp32"] = time_engine(fns["tvm_fp32"], x, max(3, args.repeat // 10), 1)
    fast = {eng: fn for eng, fn in fns.items() if eng != "tvm_fp32"}
    probe = CoreProbe() if args.threads == 2 else None
    if fast:
        timed.update(time_interleaved(fast, x, args.repeat, args.warmup, args.rounds, each_round=probe))
    if probe is not None and probe.readings:
        res["round_pair_speedup"] = probe.readings
        res["round_one_thread_gmacs"] = probe.one_thread_gmacs
    for eng in engines:
        if eng in timed:
            res[eng] = {**timed[eng], **res[eng]}
            print(f"    {name} b{batch} {eng:15s} median {res[eng]['median_ms']:9.2f} ms", flush=True)
    if "intforge_int8" in fns and "torch_fp32" in fns:  # a fast but wrong engine must not pass unnoticed
        a, b = fns["intforge_int8"](x), fns["torch_fp32"](x)
        res["intforge_int8_top1_agreement_vs_torch"] = float(np.mean(a.argmax(1) == b.argmax(1)))
    if "intforge_int8" in res and "ort_int8" in res and "median_ms" in res["intforge_int8"] \
            and "median_ms" in res["ort_int8"]:
        res["ratio_intforge_int8_over_ort_int8"] = round(res["intforge_int8"]["median_ms"]
                                                         / res["ort_int8"]["median_ms"], 3)
        res["paired_ratio_intforge_int8_over_ort_int8"] = paired_ratio(res["intforge_int8"], res["ort_int8"])
        print(f"    {name} b{batch} intforge INT8 / ORT INT8: {res['ratio_intforge_int8_over_ort_int8']} "
              f"(medians), {res['paired_ratio_intforge_int8_over_ort_int8']} (round by round)", flush=True)
        split = split_by_cores(res, probe.readings) if probe is not None else None
        if split is not None:
            res["paired_ratio_by_cores"] = split
            print(f"    round by round, vCPUs on cores apart (2 threads >= {CORES_APART}x one): "
                  f"{split['paired_ratio_apart']} ({split['rounds_apart']} rounds); sharing: "
                  f"{split['paired_ratio_shared']} ({split['rounds_shared']} rounds)", flush=True)
    return res


def peak_rates(res: dict[str, Any], peak_gmacs: float | None) -> dict[str, Any]:
    """Whole-model MAC rates: each INT8 engine's, and the rate 0.75x ORT INT8's latency would take, as
    GMAC/s and as a fraction of the measured INT8 peak."""
    out: dict[str, Any] = {}
    macs = res.get("macs")
    if not macs:
        return out
    for eng in ("ort_int8", "intforge_int8"):
        if "median_ms" in res.get(eng, {}):
            out[f"{eng}_gmacs_per_s"] = round(macs / res[eng]["median_ms"] / 1e6, 1)
    if "median_ms" in res.get("ort_int8", {}):
        out["gmacs_per_s_needed_for_0.75x_ort_int8"] = round(macs / (0.75 * res["ort_int8"]["median_ms"]) / 1e6, 1)
    if peak_gmacs:
        out.update({k.replace("gmacs_per_s", "fraction_of_measured_peak"): round(v / peak_gmacs, 3)
                    for k, v in list(out.items())})
    return out


def plot(result: dict[str, Any], path: Path, title: str | None = None) -> None:
    """Grouped bars of median latency per (model, batch), one bar per engine (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(m, b) for m in result["results"] for b in result["results"][m]]
    engines = result["engines"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 4.8))
    width = 0.8 / len(engines)
    for k, eng in enumerate(engines):
        vals = [result["results"][m][b].get(eng, {}).get("median_ms", np.nan) for m, b in cases]
        ax.bar([i + k * width for i in range(len(cases))], vals, width, label=eng)
    ax.set_yscale("log")
    ax.set_ylabel("median latency, ms (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [f"{m}\nbatch {b}" for m, b in cases])
    ax.set_title(title or f"CPU latency, {result['threads']} threads, {result['machine']['cpu_model']}",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_peak_fraction(name: str, args: argparse.Namespace, peak_gmacs: float,
                        amx_gmacs: float | None = None) -> list[dict[str, Any]]:
    from intforge import zoo

    try:
        rows = peak_fraction(getattr(zoo, name)(seed=0).eval(), (1, 3, 224, 224), args.top_convs, args.threads,
                             peak_gmacs, amx_gmacs)
    except Exception as exc:  # noqa: BLE001 - keep the latency numbers if this part fails
        print(f"    peak fraction failed: {type(exc).__name__}: {exc}", flush=True)
        return []
    for r in rows:
        print(f"    peak: {name} {r['layer']:24s} {r['gmacs_per_s']:8.1f} GMAC/s = "
              f"{r['fraction_of_int8_peak']:.1%} of INT8 peak"
              + (f", {r['fraction_of_amx_peak']:.1%} of AMX's" if "fraction_of_amx_peak" in r else ""), flush=True)
    return rows


def peak_only(args: argparse.Namespace) -> int:
    """Redo the layer-alone peak fractions of an earlier run, in a process that has run no other engine."""
    result = json.loads(args.out.read_text())
    peak_gmacs = result["int8_peak_gmacs"]["measured"] or result["int8_peak_gmacs"]["nominal"]
    for name in args.models.split(","):
        result["peak_fraction"][name] = model_peak_fraction(name, args, peak_gmacs,
                                                            result["int8_peak_gmacs"].get("amx_measured"))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"updated the peak fractions in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_thread_env(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.peak_only:
        return peak_only(args)
    engines = args.engines.split(",")
    result: dict[str, Any] = {"benchmark": "CPU latency suite", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
                              "machine": {**machine_info(), "cpu_ghz": cpu_ghz()}, "versions": versions(),
                              "threads": args.threads, "engines": engines, "results": {}, "peak_fraction": {},
                              "int8_peak_gmacs": {"measured": measured_int8_peak(args.threads),
                                                  "nominal": round(nominal_int8_peak(args.threads), 1),
                                                  "amx_measured": measured_amx_peak(args.threads)},
                              "peak_note": f"measured: {(peak_tool() or ('none',))[0]}, register-only vpdpbusd "
                                           "(vnni_peak.c) or vpmaddwd + vpaddd (avx2_peak.c) on every thread; nominal: "
                                           f"{macs_per_cycle()} int8 MACs/cycle/core x threads x cpu MHz "
                                           "(the base clock; the CPU boosts above it)"}
    peak_gmacs = result["int8_peak_gmacs"]["measured"] or result["int8_peak_gmacs"]["nominal"]
    print(f"INT8 peak: {result['int8_peak_gmacs']} GMAC/s", flush=True)
    result["thread_skew"] = {"before": thread_skew()}
    print(f"thread skew before: {result['thread_skew']['before']}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cpu_suite_") as tmp:
        for name in args.models.split(","):
            result["results"][name] = {}
            for batch in (int(b) for b in args.batches.split(",")):
                print(f"[{name} batch {batch}]", flush=True)
                res = result["results"][name][batch] = run_model(name, batch, args, engines, Path(tmp))
                res["rates"] = peak_rates(res, peak_gmacs)
                if res["rates"]:
                    print(f"    rates: {res['rates']}", flush=True)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    result["thread_skew"]["after"] = thread_skew()
    print(f"thread skew after: {result['thread_skew']['after']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.top_convs:
        # In a fresh process: in this one, after the other engines, some layers timed alone came out 2x
        # slow (MobileNetV2's 16->96 1x1 conv 0.33 ms, against 0.16 in a process that ran nothing else).
        import subprocess

        subprocess.run([sys.executable, __file__, "--peak-only", "--models", args.models, "--threads",
                        str(args.threads), "--top-convs", str(args.top_convs), "--out", str(args.out)], check=False)
        result = json.loads(args.out.read_text())
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} ({result['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    sys.exit(main())
