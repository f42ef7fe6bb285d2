"""GPU latency: intforge INT8 and mixed INT4/INT8 Tensor Core builds against PyTorch FP32 / FP16 (cuDNN).

Models: ResNet18, MobileNetV2 (torchvision, seeded random weights: latency does not depend on the values)
and the MNIST net, at batch 1, 8 and 64, on GPU 0, all in one run:
    torch_fp32, torch_fp16   PyTorch eager on CUDA, torch.inference_mode, cudnn.benchmark on; needs a CUDA
                             build of torch (the pinned CPU build records them as unavailable)
    intforge_int8            `--target cuda` (this GPU's sm_XY): INT8 mma.sync kernels
    intforge_mixed           the same with the first half of the convs (after the stem) at INT4
Each intforge build is also checked bit for bit against the reference on the timed batch before it is timed.
The builds run first, `--jobs` side by side; the timings then run one at a time.
intforge timing: TVM's time evaluator with inputs resident on the GPU; torch: CUDA events.

Writes JSON (`--out`) and a bar chart beside it. Without a GPU it says so and exits 2.
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

ROOT = Path(__file__).resolve().parent
MODELS = {"resnet18": (3, 224), "mobilenet_v2": (3, 224), "mnist": (1, 28)}
ENGINES = ("torch_fp32", "torch_fp16", "intforge_int8", "intforge_mixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--jobs", type=int, default=4, help="intforge builds run side by side before timing")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_suite.json")
    return p.parse_args(argv)


def make_model(name: str):
    from intforge import zoo

    return zoo.mnist_net().eval() if name == "mnist" else getattr(zoo, name)().eval()


def inputs(name: str, batch: int, n: int) -> np.ndarray:
    from intforge import zoo

    c, s = MODELS[name]
    if name == "mnist":
        x, _ = zoo.mnist_digits()
        return np.resize(x, (max(batch, n), c, s, s)).astype(np.float32)
    return zoo.random_images(max(batch, n), size=s)


def mixed_bits(model) -> dict[str, int]:
    convs = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2d" and m.groups == 1]
    return {n: 4 for n in convs[1: 1 + len(convs) // 2]}


def time_torch(model, x: np.ndarray, half: bool, repeat: int, warmup: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable: this torch build has no CUDA (install a CUDA build to compare)"}
    torch.backends.cudnn.benchmark = True
    m = model.cuda().half() if half else model.cuda()
    xt = torch.from_numpy(x).cuda()
    xt = xt.half() if half else xt
    ts = []
    with torch.inference_mode():
        for _ in range(warmup):
            m(xt)
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            m(xt)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
    model.cpu().float()
    from intforge.runtime import latency_stats

    return latency_stats(ts, repeat, warmup)


def build_case(name: str, batch: int, eng: str, work: str) -> dict[str, Any]:
    """Quantize and build one intforge engine for one model and batch, and compute the reference's output
    for the batch: the CPU half of a case, run in a worker process."""
    import torch

    import intforge
    from intforge import reference
    from intforge.compiler import build
    from intforge.quantize import QuantConfig

    model = make_model(name)
    x = inputs(name, batch, 32)
    calib, xb = x[:32], x[:batch]
    bits = mixed_bits(model) if eng == "intforge_mixed" else {}
    t0 = time.perf_counter()
    program, _ = intforge.quantize_model(model, (torch.from_numpy(xb.copy()),), calib,
                                         quant=QuantConfig(layer_bits=bits))
    out = Path(work) / f"{name}_b{batch}_{eng}"
    art = build(program, out, target="cuda")
    built = time.perf_counter() - t0
    np.save(out / "reference.npy", reference.run_float(program, xb)[0])
    return {"library": str(art.library), "int4_layers": len(bits), "weight_bytes": art.manifest["weight_bytes"],
            "kernels": art.manifest["kernels"], "build_seconds": round(built, 1)}


def run_case(name: str, batch: int, built: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Time every engine of one case on the GPU, one after another; intforge's builds come ready from
    `build_case` and are checked bit for bit against the reference before they are timed."""
    import intforge

    model = make_model(name)
    xb = inputs(name, batch, 32)[:batch]
    res: dict[str, Any] = {}
    for eng in ENGINES:
        try:
            if eng.startswith("torch"):
                res[eng] = time_torch(model, xb, eng == "torch_fp16", args.repeat, args.warmup)
            elif "error" in built[eng]:
                res[eng] = dict(built[eng])
            else:
                info = built[eng]
                lib = intforge.load(info["library"])
                want = np.load(Path(info["library"]).parent / "reference.npy")
                exact = bool(np.array_equal(lib(xb), want))
                res[eng] = {**lib.time(args.repeat, args.warmup), "bit_exact": exact,
                            **{k: v for k, v in info.items() if k != "library"}}
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            res[eng] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        shown = f"{res[eng]['median_ms']:9.3f} ms" if "median_ms" in res[eng] else res[eng]["error"]
        print(f"  {name} b{batch} {eng:15s} {shown}", flush=True)
    return res


def build_all(cases: list[tuple[str, int]], work: Path, jobs: int) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Every intforge build of the run, `jobs` at a time in worker processes (nvcc and the reference are
    CPU work; running them beside each other leaves the GPU idle for less time than building case by case)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    keys = [(n, b, e) for n, b in cases for e in ENGINES if e.startswith("intforge")]
    done: dict[tuple[str, int, str], dict[str, Any]] = {}
    with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(build_case, *k, str(work)) for k in keys}
        for k, fut in futures.items():
            try:
                done[k] = fut.result()
            except Exception as exc:  # noqa: BLE001 - reported in the JSON beside the other engines
                done[k] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  built {k[0]} b{k[1]} {k[2]}: {done[k].get('build_seconds', done[k].get('error'))}",
                  flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from intforge import cuda_env

    if not cuda_env.gpu_available():
        print("bench_gpu: no CUDA GPU on this machine; nothing measured (the GPU numbers in the README say "
              "where they were taken)", file=sys.stderr)
        return 2
    import tvm

    gpu = f"{tvm.cuda(0).device_name} ({cuda_env.local_arch()})"
    result: dict[str, Any] = {"benchmark": "GPU latency", "gpu": gpu, "engines": list(ENGINES),
                              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": {}}
    cases = [(n, int(b)) for n in args.models.split(",") for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        t0 = time.perf_counter()
        built = build_all(cases, Path(tmp), args.jobs)
        result["build_seconds"] = round(time.perf_counter() - t0, 1)
        for name, b in cases:
            mine = {e: built[(name, b, e)] for e in ENGINES if e.startswith("intforge")}
            result["results"].setdefault(name, {})[str(b)] = run_case(name, b, mine, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    sys.path.insert(0, str(ROOT))
    from bench_cpu_suite import plot  # the same grouped bar chart as the CPU suite

    plot(result, args.out.with_suffix(".png"), title=f"GPU latency, {gpu}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
