"""The `intforge` command line: a thin layer over intforge.compile / intforge.load."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IntforgeError


def load_model_ref(ref: str) -> Any:
    """`pkg.module:factory` -> factory(); `file.pt2` -> torch.export program; `.onnx` -> clear error."""
    path = Path(ref)
    if ref.endswith(".onnx"):
        raise IntforgeError(f"{ref}: ONNX import is not supported yet; export the model from PyTorch and pass "
                            "a `pkg.module:factory` reference or a torch.export .pt2 file.")
    if ref.endswith((".pt2", ".pt")):
        import torch

        if not path.exists():
            raise IntforgeError(f"model file {ref} does not exist")
        try:
            return torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001
            raise IntforgeError(f"{ref} is not a saved torch.export program ({exc}); save one with "
                                "torch.export.save(torch.export.export(model, args), path)") from None
    mod_name, sep, attr = ref.partition(":")
    if not sep:
        raise IntforgeError(f"model {ref!r} is not `pkg.module:factory`, a .pt2 file or an .onnx file")
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise IntforgeError(f"cannot import {mod_name!r} for model {ref!r}: {exc}") from None
    if not hasattr(module, attr):
        raise IntforgeError(f"module {mod_name!r} has no attribute {attr!r}")
    obj = getattr(module, attr)
    return obj() if callable(obj) and not hasattr(obj, "forward") else obj


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must look like 1,3,224,224") from None


def cmd_compile(args: argparse.Namespace) -> int:
    import torch

    from . import api
    from .datasets import load_data

    model = load_model_ref(args.model)
    calib, _ = load_data(args.calib, args.calib_count) if args.calib else (None, None)
    if args.input_shape:
        example = torch.zeros(args.input_shape)
        if calib is not None and calib.ndim == len(args.input_shape):
            example = torch.from_numpy(np.ascontiguousarray(calib[: args.input_shape[0]], dtype=np.float32))
    elif calib is not None:
        example = torch.from_numpy(np.ascontiguousarray(calib[:1], dtype=np.float32))
    else:
        raise IntforgeError("give --input-shape (e.g. 1,3,224,224) or --calib data to take the shape from")
    t0 = time.perf_counter()
    art = api.compile(model, (example,), calib, output=args.output, target=args.target, boundary=args.boundary,
                      calibration=args.calib_method)
    m = art.manifest
    print(f"compiled {args.model} -> {art.library} ({art.library.stat().st_size / 1e6:.2f} MB) "
          f"in {time.perf_counter() - t0:.1f}s")
    print(f"  target {m['target']['preset']} (mcpu {m['target']['mcpu']}), boundary {m['boundary']}, "
          f"{len(m['layers'])} quantized layers, integer-only: {'yes' if m['integer_only'] else 'NO'}")
    print(f"  manifest {art.manifest_path}, integer program {art.program_path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .datasets import load_data
    from .runtime import load

    model = load(args.library)
    if args.input:
        xs = [np.load(p) for p in args.input]
        out = model(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        if args.output:
            np.save(args.output, outs[0])
            print(f"wrote {args.output}")
        for spec, o in zip(model.outputs, outs, strict=True):
            print(f"{spec['name']}: shape {o.shape} dtype {o.dtype}")
            print(np.array2string(o, threshold=40, precision=4))
        return 0
    if not args.data:
        raise IntforgeError("give --input x.npy (one per model input) or --data SET (e.g. mnist, or an .npz "
                            "with x and y) to evaluate")
    x, y = load_data(args.data, args.count)
    preds, latency = predict(model, x)
    if y is None:
        print(f"ran {len(x)} samples; no labels given, so no accuracy")
    else:
        acc = float((preds == y).mean())
        print(f"accuracy {acc:.4f} on {len(y)} labelled samples ({model.library.name})")
    print(f"latency {latency * 1e3:.3f} ms per batch of {model.batch_size}")
    return 0


def predict(model: Any, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Class predictions over a data set, batch by batch at the library's compiled batch size."""
    b = model.batch_size
    want = tuple(model.inputs[0]["shape"][1:])
    if tuple(x.shape[1:]) != want:
        if int(np.prod(x.shape[1:])) == int(np.prod(want)):
            x = x.reshape(len(x), *want)
        else:
            raise IntforgeError(f"data samples have shape {x.shape[1:]}, the model takes {want}")
    preds = []
    times = []
    for start in range(0, len(x), b):
        chunk = x[start:start + b]
        n = len(chunk)
        if n < b:  # pad the last batch; padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
        t0 = time.perf_counter()
        out = model(chunk)
        times.append(time.perf_counter() - t0)
        out = out[0] if isinstance(out, tuple) else out
        preds.append(out.reshape(b, -1)[:n].argmax(axis=1))
    return np.concatenate(preds), float(np.median(times))


def cmd_inspect(args: argparse.Namespace) -> int:
    from .relay_passes import emit_program, find_float_values
    from .runtime import load

    model = load(args.library)
    m = model.manifest
    program = model.program()
    floats = find_float_values(emit_program(program, boundary=m["boundary"]))
    verdict = "yes" if not floats else f"NO ({len(floats)} float values inside the integer graph)"
    if args.json:
        print(json.dumps({**m, "integer_only_verified": not floats}, indent=2))
        return 0
    print(f"{model.library}  ({model.library.stat().st_size / 1e6:.2f} MB, sha256 {m['library_sha256'][:16]}...)")
    print(f"target: {m['target']['preset']} (llvm -mcpu={m['target']['mcpu']})   boundary: {m['boundary']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for kind in ("inputs", "outputs"):
        for spec in m[kind]:
            print(f"{kind[:-1]:6s} {spec['name']}: {spec['dtype']}{tuple(spec['shape'])}  quantized "
                  f"{spec['quantized_dtype']} scale {spec['scale']:.6g}")
    print(f"integer-only: {verdict} (floats only at the input quantize and output dequantize)"
          if m["boundary"] == "float" else f"integer-only: {verdict} (integer inputs and outputs)")
    print(f"\n{'layer':32s} {'kind':7s} {'weight shape':18s} {'W bits':>6s} {'A bits':>6s} {'params':>9s} "
          f"{'MMACs':>8s}")
    for row in m["layers"]:
        print(f"{row['name'][:32]:32s} {row['kind']:7s} {str(tuple(row['weight_shape'])):18s} "
              f"{row['weight_bits']:6d} {row['act_bits']:6d} {row['params']:9d} {row['macs'] / 1e6:8.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="intforge", description="Integer-only compilation of PyTorch models via TVM")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an integer-only model.so + model.json")
    c.add_argument("model", help="pkg.module:factory, a torch.export .pt2 file (ONNX: not yet)")
    c.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (batch first)")
    c.add_argument("--calib", help="calibration data: mnist[:N], or a .npy / .npz file of inputs")
    c.add_argument("--calib-count", type=int, default=512, help="calibration samples to use (default 512)")
    c.add_argument("--calib-method", choices=("minmax", "percentile"), default="minmax")
    c.add_argument("--target", default="x86", help="target preset (default x86: this machine)")
    c.add_argument("--boundary", choices=("float", "int"), default="float",
                   help="float: float32 in/out with one quantize/dequantize; int: integer in/out")
    c.add_argument("-o", "--output", default="build/model", help="output directory or .so path")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a compiled model.so on .npy inputs or a labelled set")
    r.add_argument("library", help="model.so (its model.json must sit beside it)")
    r.add_argument("--input", nargs="+", help=".npy file per model input")
    r.add_argument("--output", help="where to save the first output (.npy)")
    r.add_argument("--data", help="labelled set to evaluate: mnist, or an .npz with x and y")
    r.add_argument("--count", type=int, help="evaluate only the first N samples")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="show a model.so's manifest, layer table and integer-only verdict")
    i.add_argument("library")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IntforgeError as exc:
        print(f"intforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
