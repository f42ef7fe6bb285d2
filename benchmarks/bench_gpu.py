"""GPU latency: intforge INT8 and mixed INT4/INT8 Tensor Core builds against PyTorch FP32 / FP16 (cuDNN).

Models: ResNet18, MobileNetV2 (torchvision, seeded random weights: latency does not depend on the values)
and the MNIST net, at batch 1, 8 and 64, on GPU 0, all in one run:
    torch_fp32, torch_fp16   PyTorch eager on CUDA, torch.inference_mode, cudnn.benchmark on; needs a CUDA
                             build of torch (the pinned CPU build records them as unavailable)
    intforge_int8            `--target cuda` (this GPU's sm_XY): INT8 mma.sync kernels
    intforge_mixed           the same with the first half of the convs (after the stem) at INT4
Each intforge build is also checked bit for bit against the reference on one batch before it is timed.
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


def run_case(name: str, batch: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    import intforge
    from intforge import reference
    from intforge.compiler import build
    from intforge.quantize import QuantConfig

    model = make_model(name)
    x = inputs(name, batch, 32)
    calib, xb = x[:32], x[:batch]
    res: dict[str, Any] = {}
    for eng in ENGINES:
        t0 = time.perf_counter()
        try:
            if eng.startswith("torch"):
                res[eng] = time_torch(model, xb, eng == "torch_fp16", args.repeat, args.warmup)
            else:
                bits = mixed_bits(model) if eng == "intforge_mixed" else {}
                program, _ = intforge.quantize_model(model, (torch.from_numpy(xb.copy()),), calib,
                                                     quant=QuantConfig(layer_bits=bits))
                art = build(program, work / f"{name}_b{batch}_{eng}", target="cuda")
                lib = intforge.load(art.library)
                exact = bool(np.array_equal(lib(xb), reference.run_float(program, xb)[0]))
                res[eng] = {**lib.time(args.repeat, args.warmup), "bit_exact": exact, "int4_layers": len(bits),
                            "weight_bytes": art.manifest["weight_bytes"], "kernels": art.manifest["kernels"]}
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            res[eng] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        res[eng]["setup_seconds"] = round(time.perf_counter() - t0, 1)
        shown = f"{res[eng]['median_ms']:9.3f} ms" if "median_ms" in res[eng] else res[eng]["error"]
        print(f"  {name} b{batch} {eng:15s} {shown}", flush=True)
    return res


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
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
        for name in args.models.split(","):
            result["results"][name] = {}
            for b in (int(v) for v in args.batches.split(",")):
                result["results"][name][str(b)] = run_case(name, b, args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    sys.path.insert(0, str(ROOT))
    from bench_cpu_suite import plot  # the same grouped bar chart as the CPU suite

    plot(result, args.out.with_suffix(".png"), title=f"GPU latency, {gpu}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
