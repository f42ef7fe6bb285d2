"""The `intforge` command line: a thin layer over intforge.compile / intforge.load."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IntforgeError


def load_model_ref(ref: str) -> Any:
    """`pkg.module:factory` -> factory(); `file.pt2` -> torch.export program; `file.onnx` -> an nn.Module."""
    path = Path(ref)
    if ref.endswith(".onnx"):
        from .onnx_import import load_onnx

        return load_onnx(path)
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
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} must look like 1,3,224,224") from None
    if min(dims) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} has a dimension below 1; it must look like 1,3,224,224")
    return dims


def _shape_mismatch(shape: tuple[int, ...], samples: np.ndarray, data: str) -> IntforgeError:
    """--input-shape against data whose samples have another shape: the error, with the shape to give."""
    return IntforgeError(f"--input-shape {','.join(map(str, shape))} does not fit the samples of {data}, each "
                         f"{tuple(samples.shape[1:])}: give --input-shape {shape[0]},"
                         f"{','.join(map(str, samples.shape[1:]))} or data of that shape")


def _int_at_least(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [least, most], else argparse's usage error naming the option (a
    zero or negative count used to reach a traceback, or be read as "all", or slice samples off the end)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least or (most is not None and value > most):
            span = f"at least {least}" if most is None else f"from {least} to {most}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


_COUNT = _int_at_least(1)  # sample counts, repeats, batch sizes, thread counts
_NONNEGATIVE = _int_at_least(0)  # warm-up runs, power iterations (0: none)


def _program_from_args(args: argparse.Namespace) -> Any:
    """Capture, calibrate and quantize the model as `compile` / `tune` arguments say."""
    import torch

    from . import api
    from .datasets import load_data, spec_count

    model = load_model_ref(args.model)
    _shape_from_model(args, model)
    distilled = bool(args.calib) and args.calib.split(":")[0] == "distilled"
    tokens = args.input_shape[-1] if args.input_shape else 64  # (text data: --input-shape batch,tokens)
    calib, _ = load_data(args.calib, args.calib_count, tokens) if args.calib and not distilled else (None, None)
    if isinstance(calib, tuple):  # several inputs (token ids, mask): the example is the first batch of each
        batch = args.input_shape[0] if args.input_shape else 1
        example = tuple(torch.from_numpy(np.ascontiguousarray(a[:batch])) for a in calib)
        calib = list(calib)
    elif distilled:
        from .distill import distill_inputs

        if not args.input_shape:
            raise IntforgeError("--calib distilled needs --input-shape (the data is synthesized at that shape)")
        count = spec_count(args.calib) or 32
        print(f"distilling {count} calibration inputs from the model's BatchNorm statistics (ZeroQ)...")
        calib = distill_inputs(model, args.input_shape[1:], count=count)
    if isinstance(calib, list):
        pass
    elif args.input_shape:
        example = torch.zeros(args.input_shape)
        if calib is not None and calib.ndim == len(args.input_shape):
            if tuple(calib.shape[1:]) != tuple(args.input_shape[1:]):
                raise _shape_mismatch(args.input_shape, calib, args.calib)
            n = min(args.input_shape[0], len(calib))  # (a batch past the data's samples keeps zeros)
            example[:n] = torch.from_numpy(np.ascontiguousarray(calib[:n], dtype=np.float32))
    elif calib is not None:
        example = torch.from_numpy(np.ascontiguousarray(calib[:1], dtype=np.float32))
    else:
        raise IntforgeError("give --input-shape (e.g. 1,3,224,224) or --calib data to take the shape from")
    from .quantize import QuantConfig

    layer_bits, int4_inputs, int4_clip, int4_rounding = {}, 4, QuantConfig().int4_clip, QuantConfig().int4_rounding
    if args.plan:
        from .bitplan import read_plan

        layer_bits, int4_inputs, int4_clip, int4_rounding = read_plan(args.plan)
    int4_inputs = getattr(args, "int4_inputs", None) or int4_inputs
    int4_clip = getattr(args, "int4_clip", None) or int4_clip
    int4_rounding = getattr(args, "int4_rounding", None) or int4_rounding
    quant = QuantConfig(bits=args.bits, layer_bits=layer_bits, int4_input_bits=int4_inputs, int4_clip=int4_clip,
                        int4_rounding=int4_rounding, short_requant=not getattr(args, "precise_requant", False))
    example = example if isinstance(example, tuple) else (example,)
    program, _ = api.quantize_model(model, example, calib, calibration=args.calib_method, quant=quant)
    return program


def cmd_compile(args: argparse.Namespace) -> int:
    from .compiler import build

    t0 = time.perf_counter()
    art = build(_program_from_args(args), args.output, target=args.target, boundary=args.boundary,
                tuned=not args.untuned)
    m = art.manifest
    print(f"compiled {args.model} -> {art.library} ({art.library.stat().st_size / 1e6:.2f} MB) "
          f"in {time.perf_counter() - t0:.1f}s")
    print(f"  target {m['target']['preset']} (mcpu {m['target']['mcpu']}), boundary {m['boundary']}, "
          f"{len(m['layers'])} quantized layers, integer-only: {'yes' if m['integer_only'] else 'NO'}")
    n4 = sum(r["weight_bits"] == 4 for r in m["layers"])
    tables = f" (+ {m['table_bytes'] / 1e6:.3f} MB of embedding tables)" if m.get("table_bytes") else ""
    print(f"  bits: {len(m['layers']) - n4} layers INT8, {n4} INT4; weights {m['weight_bytes'] / 1e6:.3f} MB{tables}")
    print(f"  kernels: {m['kernels']}; schedule: {m['schedule']}")
    print(f"  manifest {art.manifest_path}, integer program {art.program_path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .compiler.tuning import tune

    t0 = time.perf_counter()
    db = tune(_program_from_args(args), target=args.target, trials=args.trials, boundary=args.boundary,
              rpc=args.rpc, tracker=args.tracker, key=args.key)
    where = f" on {args.tracker or args.rpc}" if args.rpc or args.tracker else ""
    print(f"tuned {args.model} ({args.trials} trials{where}) in {time.perf_counter() - t0:.0f}s -> database {db}")
    print(f"  `intforge compile` for target {args.target} now uses it automatically (--untuned to ignore it)")
    return 0


def _shape_from_model(args: argparse.Namespace, model: Any) -> None:
    """Without --input-shape, an ONNX file's own input shape (its batch dim, if symbolic, as 1)."""
    if not args.input_shape and hasattr(model, "example_shape"):
        args.input_shape = model.example_shape(1)
        print(f"input shape {','.join(map(str, args.input_shape))} (from {args.model}; --input-shape to change it)")


def _example_and_data(args: argparse.Namespace, model: Any,
                      several: bool = False) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
    """Example input (from --input-shape, the model file or the data) and the data set (x, y) if --data was
    given. With `several` (analyze, plan), data of several inputs (token ids and masks) comes as a tuple of
    arrays, and the example as a tuple of their first rows (as many as --input-shape's batch)."""
    import torch

    from .datasets import load_data

    _shape_from_model(args, model)

    x = y = None
    if getattr(args, "data", None):
        tokens = args.input_shape[1] if args.input_shape and len(args.input_shape) == 2 else 64
        x, y = load_data(args.data, getattr(args, "count", None), tokens)
        if isinstance(x, tuple):
            if not several:
                raise IntforgeError(f"--data {args.data}: this command takes one-input models' data (images); "
                                    "text data (token ids and masks) works with compile, tune, analyze, plan, "
                                    "schedules and compare")
            batch = args.input_shape[0] if args.input_shape else 1
            return tuple(torch.from_numpy(np.ascontiguousarray(a[:batch])) for a in x), x, y
        x = np.ascontiguousarray(x, dtype=np.float32)
    if args.input_shape:
        want = tuple(args.input_shape[1:])
        if x is not None and tuple(x.shape[1:]) != want:
            # samples of another rank with as many values (flat vectors for an image model) are reshaped
            if x.ndim == len(args.input_shape) or int(np.prod(x.shape[1:])) != int(np.prod(want)):
                raise _shape_mismatch(args.input_shape, x, args.data)
            x = x.reshape(len(x), *want)
        return torch.zeros(args.input_shape), x, y
    if x is None:
        raise IntforgeError("give --input-shape (e.g. 1,3,224,224) or --data to take the shape from")
    return torch.from_numpy(x[:1]), x, y


def cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    model = load_model_ref(args.model)
    if not isinstance(model, torch.nn.Module):
        raise IntforgeError("`analyze` needs the nn.Module (pkg.module:factory): a .pt2 program has no gradients")
    _, x, y = _example_and_data(args, model, several=True)
    if x is None:
        raise IntforgeError("`analyze` needs data: --data mnist:256, random:32, snippets:16 or an .npz with x "
                            "(and y)")
    if isinstance(x, tuple):
        return _analyze_encoder(args, model, x)
    try:  # one sample first: a model that cannot take the data fails here, not deep inside a Hessian product
        with torch.no_grad():
            model.eval()(torch.from_numpy(x[:1]))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, the user's fix is the shape or the data
        raise IntforgeError(f"{args.model} cannot run on samples of shape {tuple(x.shape[1:])} from {args.data} "
                            f"({type(exc).__name__}: {str(exc)[:200]}); check --input-shape and the data") from None
    if y is None:  # no labels: the float model's own predictions stand in (data-free sensitivity)
        with torch.no_grad():
            y = np.concatenate([model.eval()(torch.from_numpy(x[i:i + 64])).argmax(1).numpy()
                                for i in range(0, len(x), 64)])
        print(f"  no labels in {args.data}: using the float model's predictions as targets")
    batches = [(torch.from_numpy(x[i:i + args.batch_size]), torch.as_tensor(y[i:i + args.batch_size]))
               for i in range(0, len(x), args.batch_size)]
    return _analyze_and_report(args, model, batches, None, len(x))


def _analyze_encoder(args: argparse.Namespace, model: Any, xs: tuple[np.ndarray, ...]) -> int:
    """`analyze` on data of several inputs (token ids and a padding mask): the loss is the output's squared
    distance to the float model's own (`hessian.output_distortion`), whose Hessian is the output's
    sensitivity to each layer's weights; a padded token's output does not count."""
    import torch

    from .hessian import output_distortion

    n = len(xs[0])
    batches = []
    for i in range(0, n, args.batch_size):
        part = tuple(torch.from_numpy(np.ascontiguousarray(a[i:i + args.batch_size])) for a in xs)
        try:
            with torch.no_grad():
                want = model.eval()(*part)
        except Exception as exc:  # noqa: BLE001 - whatever the model raises, the fix is the data or the model
            shapes = [tuple(a.shape[1:]) for a in xs]
            raise IntforgeError(f"{args.model} cannot run on the {len(xs)} inputs of {args.data} (shapes {shapes}; "
                                f"{type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(want, torch.Tensor):
            raise IntforgeError(f"{args.model} returns {type(want).__name__}; `analyze` takes a model of one "
                                "tensor output (an encoder's hidden states)")
        want = want.detach().clone().float()
        mask = part[-1]
        if len(xs) > 1 and want.dim() >= 3 and tuple(want.shape[:2]) == tuple(mask.shape):
            want[mask == 0] = float("nan")  # (a padded token's hidden state is no part of the result)
        batches.append((part, want))
    print(f"  {args.data}: {len(xs)} inputs; the loss is the output's squared distance to the float model's "
          "(padded tokens left out)")
    return _analyze_and_report(args, model, batches, output_distortion, n)


def _analyze_and_report(args: argparse.Namespace, model: Any, batches: list, loss_fn: Any, samples: int) -> int:
    from .capture import short_layer_name
    from .hessian import analyze

    t0 = time.perf_counter()
    report = analyze(model, batches, loss_fn=loss_fn, tol=args.tol, max_probes=args.max_probes,
                     power_iters=args.power_iters, density=args.density, seed=args.seed, progress=not args.quiet,
                     probe=args.probe)
    out = Path(args.output)
    report.to_json(out)
    plot = report.plot(out.with_suffix(".png"))
    print(f"analyzed {len(report.layers)} layers on {samples} samples in {time.perf_counter() - t0:.1f}s "
          f"-> {out}, {plot}")
    print(f"{'layer':32s} {'params':>9s} {'trace/n':>11s} {'top eig':>11s} {'probes':>6s}")
    for s in sorted(report.layers, key=lambda s: -s.trace_per_param):
        print(f"{short_layer_name(s.name, 32):32s} {s.num_params:9d} {s.trace_per_param:11.4g} "
              f"{s.top_eigenvalue:11.4g} {s.probes:6d}")
    return 0


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ms": 1.0, "s": 1e3,
          "us": 1e-3}


def parse_budget(kind: str, text: str) -> Any:
    """'50%' -> fraction between all-INT4 and all-INT8; '3.2MB', '1.5G', '12ms' or a plain number -> absolute."""
    from .planner import Budget

    t = text.strip().lower()
    if t.endswith("%"):
        try:
            percent = float(t[:-1])
        except ValueError:
            raise IntforgeError(f"cannot read {kind} budget {text!r}: a percentage looks like 50%") from None
        if not 0.0 <= percent <= 100.0:
            raise IntforgeError(f"a {kind} budget in percent runs from 0% (every layer at the lowest bits) to 100% "
                                f"(every layer at the highest); got {text}. For an absolute limit give a number "
                                "with a unit (size: 3.2MB; bops: 1.5G; latency: 12ms)")
        return Budget(kind, percent / 100.0, relative=True)
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit and unit not in _UNITS:
        raise IntforgeError(f"cannot read {kind} budget {text!r}: use a percentage (50%) or a number with a unit "
                            "(size: B/kB/MB; bops: k/M/G/T; latency: ms/s/us)")
    try:
        return Budget(kind, float(num) * _UNITS.get(unit, 1.0), relative=False)
    except ValueError:
        raise IntforgeError(f"cannot read {kind} budget {text!r}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    from .bitplan import plan_layers, residual_ties
    from .capture import capture
    from .hessian import SensitivityReport
    from .planner import pareto, plan, plot_pareto
    from .quantize import SUPPORTED_BITS

    model = load_model_ref(args.model)
    example, x, _ = _example_and_data(args, model, several=True)
    example = example if isinstance(example, tuple) else (example,)
    graph = capture(model, example)
    report = SensitivityReport.from_json(args.analysis)
    try:
        bits = tuple(int(b) for b in args.bits.split(","))
    except ValueError:
        raise IntforgeError(f"--bits {args.bits}: give bit widths separated by commas, e.g. 4,8") from None
    if not bits or set(bits) - set(SUPPORTED_BITS):
        raise IntforgeError(f"--bits {args.bits}: intforge compiles layers at "
                            f"{' or '.join(map(str, SUPPORTED_BITS))} bits, so a plan may choose only among those")
    budgets = [parse_budget(k, v) for k, v in (("size", args.size), ("bops", args.bops), ("latency", args.latency))
               if v]
    latency = None
    if args.latency or args.measure_latency:
        from .latency import measure_layer_latency

        print("measuring per-layer latency on the target (cached for next time)...")
        latency = measure_layer_latency(graph, bits, target=args.target, progress=not args.quiet)
    int4 = None
    if (args.int4_clip == "output" or args.int4_rounding == "gptq") and 4 in bits:
        if x is None:
            print(f"  (the 4-bit perturbations estimated with the mse clip"
                  f"{' and rounding to nearest' if args.int4_rounding == 'gptq' else ''}: give --data, the "
                  f"calibration data, to measure them as compile will quantize)")
        else:  # the "output" clip and GPTQ read calibration inputs: measured on the model quantized at 4 bits
            from .bitplan import deployed_int4_perturbations

            int4 = deployed_int4_perturbations(graph, x, args.int4_inputs, args.int4_clip, args.int4_rounding)
            samples = len(x[0]) if isinstance(x, tuple) else len(x)
            print(f"  4-bit perturbations measured on the model quantized at 4 bits ({samples} samples of "
                  f"{args.data}{', as its inputs see them' if args.int4_rounding == 'gptq' else ''})")
    layers = plan_layers(graph, report, bits, latency, int4_input_bits=args.int4_inputs, int4_clip=args.int4_clip,
                         int4_perturbations=int4)
    pin = {}
    for item in args.pin or []:
        name, _, b = item.partition("=")
        pin[name] = int(b or max(bits))
    tie = [t.split(",") for t in args.tie or []]
    if args.tie_residual:
        tie += residual_ties(graph)
    common = dict(bits=bits, pin=pin or None, tie=tie or None, pin_first_last=args.pin_first_last)
    if args.pareto:
        kind = budgets[0].kind if budgets else "size"
        others = [b for b in budgets if b.kind != kind]
        plans = pareto(layers, kind=kind, points=args.points, budgets=others, **common)
        path = plot_pareto(plans, Path(args.output).with_suffix(".pareto.png"))
        print(f"pareto frontier over {kind}: {len(plans)} plans -> {path}")
        for p in plans:
            n4 = sum(b == min(bits) for b in p.bits.values())
            print(f"  size {p.size_bytes / 1e6:8.3f} MB  bops {p.bops / 1e9:9.3f} G  objective {p.objective:.4g}  "
                  f"{n4} layers at {min(bits)} bits")
    result = plan(layers, budgets=budgets, **common)
    result.int4_clip, result.int4_rounding = args.int4_clip, args.int4_rounding
    result.to_json(args.output)
    print(result.summary())
    print(f"plan -> {args.output}   (use: intforge compile {args.model} --plan {args.output} ...)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .datasets import load_data
    from .runtime import load

    model = load(args.library, emulate=args.emulate)
    if args.emulate and not hasattr(model, "run_many"):  # (an EmulatedModel has run_many)
        print(f"  --emulate: {Path(args.library).name} is built for this machine's architecture; it runs natively")
    if args.input:
        xs = []
        for path in args.input:
            if not Path(path).is_file():
                raise IntforgeError(f"input file {path} does not exist")
            try:
                xs.append(np.load(path, allow_pickle=False))
            except (OSError, ValueError):
                raise IntforgeError(f"cannot read input {path}: not a .npy array (save one with numpy.save)") \
                    from None
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
    if np.isnan(latency):
        print(f"ran under emulation ({model.qemu_cpu}): no latency (time it on the board with bench --rpc)")
    else:
        print(f"latency {latency * 1e3:.3f} ms per batch of {model.batch_size}")
    return 0


def _fit_samples(x: np.ndarray, want: tuple[int, ...], what: str) -> np.ndarray:
    """Samples reshaped to the model's input (flat vectors for an image model), or an error saying both."""
    if tuple(x.shape[1:]) == want:
        return x
    if int(np.prod(x.shape[1:])) != int(np.prod(want)):
        raise IntforgeError(f"{what} have shape {x.shape[1:]}, the model takes {want}")
    return x.reshape(len(x), *want)


def predict(model: Any, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Class predictions over a data set, batch by batch at the library's compiled batch size."""
    b = model.batch_size
    x = _fit_samples(x, tuple(model.inputs[0]["shape"][1:]), "data samples")
    if hasattr(model, "run_many"):  # emulated: one emulator start for all batches, and no timing
        pad = (-len(x)) % b
        xp = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
        out = model.run_many(xp)[0]
        return out.reshape(len(xp), -1)[: len(x)].argmax(axis=1), float("nan")
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
    from .runtime import program_of, read_checked

    library, m = read_checked(args.library)  # nothing runs: cross-compiled and GPU libraries are inspectable
    program = program_of(library, m)
    floats = find_float_values(emit_program(program, boundary=m["boundary"]))
    verdict = "yes" if not floats else f"NO ({len(floats)} float values inside the integer graph)"
    if args.json:
        print(json.dumps({**m, "integer_only_verified": not floats}, indent=2))
        return 0
    print(f"{library}  ({library.stat().st_size / 1e6:.2f} MB, sha256 {m['library_sha256'][:16]}...)")
    t = m["target"]
    gpu = f"cuda -arch={t['cuda_arch']}, host " if t.get("device") == "cuda" else ""
    print(f"target: {t['preset']} ({gpu}llvm -mcpu={t['mcpu']}"
          + (f" -mtriple={t['mtriple']}" if t["mtriple"] != "host" else "")
          + (f" -mattr={','.join(t['mattr'])}" if t["mattr"] else "") + f")   boundary: {m['boundary']}")
    print(f"kernels: {m.get('kernels', '?')}")
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


def cmd_schedules(args: argparse.Namespace) -> int:
    from .capture import capture
    from .schedules import compare_schedules, format_table, write_report

    model = load_model_ref(args.model)
    example, _, _ = _example_and_data(args, model, several=True)  # (a text encoder: ids and mask from --data)
    bits = {}
    if args.plan:
        from .bitplan import read_plan_bits

        bits = read_plan_bits(args.plan)
    rows = compare_schedules(capture(model, example if isinstance(example, tuple) else (example,)),
                             target=args.target, bits=bits, repeat=args.repeat)
    print(format_table(rows))
    js, png = write_report(rows, args.output)
    print(f"wrote {js} and {png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import os

    if args.rpc or args.tracker:
        from .remote import RemoteModel, connect
        from .runtime import read_checked

        path, manifest = read_checked(args.library)
        model = RemoteModel(connect(args.rpc, args.tracker, args.key), path, manifest, threads=args.threads)
        where = f"on {args.rpc or args.tracker + ' (key ' + args.key + ')'} via RPC"
        threads = args.threads or "the board's default"
    else:
        if args.threads:  # read by TVM's thread pool when it starts, so set before the library loads
            os.environ["TVM_NUM_THREADS"] = str(args.threads)
        from .runtime import load
        from .threads import pool_threads

        model = load(args.library)
        where = "on this machine"
        threads = pool_threads()  # what the pool really runs, not what the environment asked for
    stats = model.time(repeat=args.repeat, warmup=args.warmup)
    pool = getattr(model, "thread_pool", "the board's")
    stats.update({"library": str(model.library), "batch": model.batch_size, "threads": threads, "where": where,
                  "thread_pool": pool,
                  "throughput_per_s": model.batch_size * 1e3 / stats["median_ms"],
                  "target": model.manifest["target"]})
    print(f"{model.library} {where}: batch {stats['batch']}, {threads} threads ({pool} pool), {args.repeat} runs "
          f"after {args.warmup} warm-up")
    print(f"  median {stats['median_ms']:.3f} ms   mean {stats['mean_ms']:.3f} +- {stats['std_ms']:.3f} ms   "
          f"min {stats['min_ms']:.3f}   p10 {stats['p10_ms']:.3f}   p90 {stats['p90_ms']:.3f} ms")
    print(f"  throughput {stats['throughput_per_s']:.1f} samples/s")
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2) + "\n")
        print(f"  wrote {args.json}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """intforge INT8 against ONNX Runtime INT8 on the same .onnx file and calibration samples: accuracy (or
    top-1 agreement with ORT's float run; for a text encoder, its sentence embeddings' cosine to ORT's float
    ones) and latency, timed in turns on the same threads. A text encoder (data of token ids and masks,
    `snippets:N`) is also compared with ORT's dynamic INT8, which ORT recommends for transformers."""
    import os

    from .datasets import load_data
    from .peers import (
        interleaved_latency,
        ort_quantize_dynamic,
        ort_quantize_static,
        ort_session,
        ratio_of_medians,
        round_ratio,
    )

    if not args.calib or args.calib.split(":")[0] == "distilled":
        raise IntforgeError("compare needs --calib data: ONNX Runtime calibrates on the same samples as intforge")
    out = Path(args.output)
    if not args.model.endswith(".onnx"):  # a PyTorch model: both engines take its ONNX export
        args.model = _export_for_ort(args, out / "model.onnx")
    if args.threads:  # read by the thread pool when it starts, so set before the library loads
        os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from .compiler import build
    from .runtime import load
    from .threads import pool_threads

    if args.target != "x86" or args.boundary != "float":
        raise IntforgeError("compare runs both engines on this machine, on float inputs: leave --target (x86) and "
                            "--boundary (float) at their defaults")
    art = build(_program_from_args(args), out / "intforge", target="x86", boundary="float", tuned=not args.untuned)
    lib = load(art.library)
    threads = pool_threads()
    shapes = [tuple(i["shape"]) for i in lib.inputs]
    b = shapes[0][0]

    def samples(spec: str, count: int | None) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
        x, y = load_data(spec, count, shapes[0][-1])
        if isinstance(x, tuple) != (len(shapes) > 1) or (isinstance(x, tuple) and len(x) != len(shapes)):
            raise IntforgeError(f"{spec} gives {len(x) if isinstance(x, tuple) else 1} input(s) a sample; the model "
                                f"takes {len(shapes)}")
        if not isinstance(x, tuple):
            return (_fit_samples(np.ascontiguousarray(x, np.float32), shapes[0][1:], f"the samples of {spec}"),), y
        for a, shape, spec_in in zip(x, shapes, lib.inputs, strict=True):
            if tuple(a.shape[1:]) != shape[1:]:
                raise IntforgeError(f"the samples of {spec} have input '{spec_in['name']}' of shape {a.shape[1:]}, "
                                    f"the model takes {shape[1:]}")
        return x, y

    calib, _ = samples(args.calib, args.calib_count)
    text = len(calib) > 1
    print(f"quantizing {args.model} with ONNX Runtime (static QDQ, per-channel, {len(calib[0])} samples"
          f"{'; and dynamic' if text else ''})...")
    qpath, qinfo = ort_quantize_static(args.model, list(calib), out / "ort_int8_qdq.onnx")
    engines = {"ort_fp32": ort_session(args.model, threads), "ort_int8": ort_session(qpath, threads)}
    quantization = {"ort_int8": qinfo}
    if text:
        dpath, quantization["ort_int8_dynamic"] = ort_quantize_dynamic(args.model, out / "ort_int8_dynamic.onnx")
        engines["ort_int8_dynamic"] = ort_session(dpath, threads)
    engines["intforge_int8"] = lib
    peers = [n for n in engines if n not in ("ort_fp32", "intforge_int8")]
    quantized = [*peers, "intforge_int8"]
    x, y = samples(args.data, args.count) if args.data else (calib, None)
    n = len(x[0])
    x = tuple(a[: n - n % b] if n >= b else np.concatenate([a] * (-(-b // n)))[:b] for a in x)
    y = y[: len(x[0])] if y is not None else None
    outs = {name: np.concatenate([np.asarray(fn(*(a[i:i + b] for a in x))) for i in range(0, len(x[0]), b)])
            for name, fn in engines.items()}
    result: dict[str, Any] = {"model": args.model, "threads": threads, "batch": b, "samples": len(x[0]),
                              "data": args.data or f"{args.calib} (the calibration samples)",
                              "ort_quantization": quantization["ort_int8"], "intforge_library": str(art.library)}
    if text:
        result["ort_dynamic_quantization"] = quantization["ort_int8_dynamic"]
    ref = outs["ort_fp32"]
    flat = {name: o.reshape(len(o), -1) for name, o in outs.items()}  # (each engine's outputs, sample by sample)
    if text and ref.ndim == 3:  # hidden states (batch, tokens, width): sentence embeddings over the real tokens
        from .zoo import mean_pooled

        mask = x[-1]
        cos = {name: (mean_pooled(outs[name], mask) * mean_pooled(ref, mask)).sum(1) for name in quantized}
        result["embedding_cosine_to_ort_fp32"] = {name: {"mean": float(c.mean()), "min": float(c.min())}
                                                  for name, c in cos.items()}
    elif flat["ort_fp32"].shape[1] > 1:  # class scores: top-1
        top = {name: f.argmax(1) for name, f in flat.items()}
        result["top1_agreement_with_ort_fp32"] = {name: float((top[name] == top["ort_fp32"]).mean())
                                                  for name in quantized}
        if y is not None:
            result["accuracy"] = {name: float((top[name] == y).mean()) for name in engines}
    scale = max(float(np.linalg.norm(flat["ort_fp32"])), 1e-30)
    result["relative_error_vs_ort_fp32"] = {name: float(np.linalg.norm(flat[name] - flat["ort_fp32"])) / scale
                                            for name in quantized}
    print(f"timing at batch {b} on {threads} threads: {args.rounds} rounds of {args.repeat} calls each, in turns...")
    timing = interleaved_latency({name: engines[name] for name in quantized},
                                 tuple(a[:b] for a in x), args.rounds, args.repeat)
    for peer in peers:  # (intforge over each ORT INT8: round by round, and of the medians)
        timing[f"ratio_over_{peer}"] = round_ratio(timing, peer, "intforge_int8")
        timing[f"ratio_of_medians_over_{peer}"] = ratio_of_medians(timing, peer, "intforge_int8")
    timing["ratio"], timing["ratio_of_medians"] = (timing["ratio_over_ort_int8"],
                                                   timing["ratio_of_medians_over_ort_int8"])
    result["latency"] = timing
    _print_comparison(result, peers, len(x[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_comparison(result: dict[str, Any], peers: list[str], samples: int) -> None:
    """`compare`'s table: a column an engine (ORT FP32, ORT's INT8s, intforge INT8), a row a measure."""
    heads = {"ort_fp32": "ORT FP32", "ort_int8": "ORT INT8", "ort_int8_dynamic": "ORT INT8 dyn",
             "intforge_int8": "intforge INT8"}
    names = ["ort_fp32", *peers, "intforge_int8"]
    print("\n" + f"{'':16s}" + " ".join(f"{heads[n]:>14s}" for n in names))

    def row(label: str, values: dict[str, float], fmt: str = "14.4f", note: str = "") -> None:
        cells = " ".join(f"{values[n]:{fmt}}" if n in values else f"{'':14s}" for n in names)
        print(f"{label:16s}{cells}{note}")

    if "accuracy" in result:
        row("accuracy", result["accuracy"], note=f"   ({samples} labelled samples)")
    if "top1_agreement_with_ort_fp32" in result:
        row("top-1 = FP32", {"ort_fp32": 1.0, **result["top1_agreement_with_ort_fp32"]})
    if "embedding_cosine_to_ort_fp32" in result:
        cos = result["embedding_cosine_to_ort_fp32"]
        row("cosine, mean", {"ort_fp32": 1.0, **{n: c["mean"] for n, c in cos.items()}},
            note=f"   (sentence embeddings vs ORT FP32's, {samples} samples)")
        row("cosine, min", {"ort_fp32": 1.0, **{n: c["min"] for n, c in cos.items()}})
    row("rel. error", {"ort_fp32": 0.0, **result["relative_error_vs_ort_fp32"]}, note="   (vs ORT FP32 outputs)")
    lat = result["latency"]
    row("latency (ms)", {n: e["median_ms"] for n, e in lat["engines"].items()}, "14.3f", "   (medians)")
    print()
    for peer in peers:
        print(f"intforge INT8 / {heads[peer]} latency: {lat[f'ratio_over_{peer}']:.3f} round by round, "
              f"{lat[f'ratio_of_medians_over_{peer}']:.3f} by medians")


def _export_for_ort(args: argparse.Namespace, path: Path) -> str:
    """A PyTorch model (`pkg.module:factory`, .pt2) as an .onnx file (peers.export_for_ort), so that ONNX
    Runtime and intforge compile the same file."""
    import torch

    from .datasets import load_data
    from .peers import export_for_ort

    model = load_model_ref(args.model)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    tokens = args.input_shape[-1] if args.input_shape and len(args.input_shape) == 2 else 64
    x, _ = load_data(args.calib, 1, tokens)
    if isinstance(x, tuple):  # token ids and masks: the first sample of each (batch 1; the axis is dynamic)
        takes = _positional_inputs(model)
        if takes is not None and takes != len(x):
            raise IntforgeError(f"--calib {args.calib} gives {len(x)} inputs a sample (token ids and masks); "
                                f"{args.model} takes {takes}: give data of its own inputs")
        example = tuple(torch.from_numpy(np.ascontiguousarray(a[:1])) for a in x)
    elif args.input_shape:
        example = torch.zeros(args.input_shape)
    else:
        example = torch.from_numpy(np.ascontiguousarray(x[:1], np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_for_ort(model.eval(), example, path)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IntforgeError(f"torch.onnx.export could not export {args.model} for ONNX Runtime ({first}); export it "
                            "yourself and pass the .onnx file") from None
    print(f"exported {args.model} to {path} (ONNX Runtime and intforge both compile this file)")
    return str(path)


def _positional_inputs(model: Any) -> int | None:
    """How many positional inputs a module's forward takes; None where it takes any number (*args)."""
    import inspect

    kinds = [p.kind for p in inspect.signature(model.forward).parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def cmd_board_server(args: argparse.Namespace) -> int:
    from .compiler.targets import resolve_target
    from .emulate import EmulatedRPCServer

    preset = resolve_target(args.target)
    if not preset.qemu_cpu:
        raise IntforgeError(f"target '{preset.name}' runs natively here; start TVM's own server instead: "
                            "python -m tvm.exec.rpc_server --port 9090")
    with EmulatedRPCServer(preset.qemu_cpu, port=args.port, tracker=args.tracker,
                           key=args.key or preset.name) as server:
        print(f"emulated {preset.name} board ({preset.qemu_cpu} under qemu) serving TVM RPC on "
              f"127.0.0.1:{server.port}; try: intforge bench model.so --rpc 127.0.0.1:{server.port}  (Ctrl-C stops)",
              flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


def _model_args(c: argparse.ArgumentParser) -> None:
    """The arguments that say how to turn a model into an integer program (shared by compile and tune)."""
    c.add_argument("model", help="pkg.module:factory, a torch.export .pt2 file or an .onnx file")
    c.add_argument("--input-shape", type=_shape, help="example input shape, e.g. 1,3,224,224 (batch first)")
    c.add_argument("--calib", help="calibration data: mnist[:N], random:N, snippets:N (token ids and masks, "
                   "--input-shape batch,tokens), a .npy / .npz file of inputs, or "
                   "distilled[:N] (data-free: synthesized from BatchNorm statistics)")
    c.add_argument("--calib-count", type=_COUNT, default=512, help="calibration samples to use (default 512)")
    c.add_argument("--calib-method", choices=("minmax", "percentile"), default="minmax")
    c.add_argument("--target", default="x86", help="target preset (default x86: this machine)")
    c.add_argument("--boundary", choices=("float", "int"), default="float",
                   help="float: float32 in/out with one quantize/dequantize; int: integer in/out")
    c.add_argument("--plan", help="per-layer bits from `intforge plan` (plan.json)")
    c.add_argument("--bits", type=int, choices=(4, 8), default=8, help="bits of layers the plan does not name")
    c.add_argument("--int4-inputs", type=int, choices=(4, 8),
                   help="input bits of 4-bit layers: 4 (W4A4) or 8 (W4A8, for transformers); default: the plan's, "
                        "else 4")
    c.add_argument("--int4-clip", choices=("max", "mse", "output"),
                   help="4-bit weights' step a channel: its largest magnitude (max), the clipping range of least "
                        "squared error (mse) or of least error on calibration inputs, attention's query and key "
                        "unclipped (output); default: the plan's, else output")
    c.add_argument("--int4-rounding", choices=("nearest", "gptq"),
                   help="4-bit weights rounded to nearest, or by GPTQ on the calibration inputs (each column's "
                        "error spread over the columns after it; linears and groups-1 convs, on their window "
                        "patches; grouped and depthwise convs round to nearest); default: the plan's, else nearest")
    c.add_argument("--precise-requant", action="store_true",
                   help="conv requantize multipliers keep 24+ bits (default: 12+ at shift 24, which x86 "
                        "kernels run on 32-bit lanes, 2-9%% faster kernels)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="intforge", description="Integer-only compilation of PyTorch models via TVM")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an integer-only model.so + model.json")
    _model_args(c)
    c.add_argument("-o", "--output", default="build/model", help="output directory or .so path")
    c.add_argument("--untuned", action="store_true", help="ignore the target's tuning database")
    c.set_defaults(func=cmd_compile)

    tu = sub.add_parser("tune", help="MetaSchedule-tune the model's kernels into the target's database")
    _model_args(tu)
    tu.add_argument("--trials", type=_COUNT, default=64, help="measured candidates in all (default 64)")
    tu.add_argument("--rpc", metavar="HOST:PORT", help="measure candidates on a board running TVM's RPC server")
    tu.add_argument("--tracker", metavar="HOST:PORT", help="measure on a board handed out by a TVM RPC tracker")
    tu.add_argument("--key", help="device key to request from the tracker (e.g. rpi5)")
    tu.set_defaults(func=cmd_tune)

    a = sub.add_parser("analyze", help="per-layer Hessian sensitivity (trace, top eigenvalue): JSON + plot")
    a.add_argument("model", help="pkg.module:factory or an .onnx file")
    a.add_argument("--data", required=True, help="mnist[:N], random:N (224x224 images), snippets:N (token ids and "
                   "masks, --input-shape batch,tokens), or an .npz with x (and y)")
    a.add_argument("--count", type=_COUNT, help="use only the first N samples")
    a.add_argument("--input-shape", type=_shape, help="reshape samples to this shape (batch first)")
    a.add_argument("--batch-size", type=_COUNT, default=64)
    a.add_argument("--max-probes", type=_COUNT, default=100, help="Hutchinson probes per layer at most")
    a.add_argument("--tol", type=float, default=1e-2, help="relative tolerance of traces and eigenvalues")
    a.add_argument("--power-iters", type=_NONNEGATIVE, default=50,
                   help="power iterations per layer (0: skip eigenvalues)")
    a.add_argument("--probe", choices=("layer", "block"), default="layer",
                   help="layer: one HVP per layer per probe (accurate); block: one HVP for all layers per probe "
                        "(noisier, many times faster on deep models)")
    a.add_argument("--density", action="store_true", help="also the eigenvalue density (Lanczos quadrature)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("-o", "--output", default="analysis.json")
    a.set_defaults(func=cmd_analyze)

    pl = sub.add_parser("plan", help="choose per-layer bits by integer linear programming under budgets")
    pl.add_argument("model", help="pkg.module:factory, .pt2 or .onnx")
    pl.add_argument("--analysis", required=True, help="analysis.json from `intforge analyze`")
    pl.add_argument("--input-shape", type=_shape, help="example input shape (batch first)")
    pl.add_argument("--data", help="take the input shape from this data instead; with --int4-clip output, the "
                                   "calibration data the 4-bit perturbations are measured on (as compile's)")
    pl.add_argument("--size", help="weight size budget: 50%% (between all-INT4 and all-INT8) or 3.2MB")
    pl.add_argument("--bops", help="bit-operations budget: 50%% or 1.5G")
    pl.add_argument("--latency", help="latency budget, measured per layer on the target: 50%% or 12ms")
    pl.add_argument("--measure-latency", action="store_true", help="measure latency even without a latency budget")
    pl.add_argument("--bits", default="4,8", help="candidate bit widths (default 4,8)")
    pl.add_argument("--int4-inputs", type=int, choices=(4, 8), default=4,
                    help="input bits of 4-bit layers: 4 (W4A4, HAWQ-V3's) or 8 (W4A8: transformers need it); "
                         "counted in BOPS, kept in the plan for compile")
    pl.add_argument("--int4-clip", choices=("max", "mse", "output"), default="output",
                    help="4-bit weights' step a channel: largest magnitude (max), least squared error (mse) or "
                         "least error on calibration inputs (output: measured on --data, without it estimated as "
                         "mse); the perturbations use it, and compile --plan takes it from the plan")
    pl.add_argument("--int4-rounding", choices=("nearest", "gptq"), default="nearest",
                    help="how compile will round the 4-bit weights (nearest, or gptq: then each 4-bit "
                         "perturbation is measured on --data as the layer's inputs see it, and compile --plan "
                         "takes it from the plan)")
    pl.add_argument("--pin-first-last", action="store_true", help="keep the first and last layer at the top bits")
    pl.add_argument("--pin", action="append", help="NAME=BITS (repeatable)")
    pl.add_argument("--tie", action="append", help="NAME,NAME,... layers that must share bits (repeatable)")
    pl.add_argument("--tie-residual", action="store_true", help="tie the two branches of every residual add")
    pl.add_argument("--pareto", action="store_true", help="sweep the budget and plot the frontier")
    pl.add_argument("--points", type=_int_at_least(2), default=11)
    pl.add_argument("--target", default="x86")
    pl.add_argument("--quiet", action="store_true")
    pl.add_argument("-o", "--output", default="plan.json")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser("run", help="run a compiled model.so on .npy inputs or a labelled set")
    r.add_argument("library", help="model.so (its model.json must sit beside it)")
    r.add_argument("--input", nargs="+", help=".npy file per model input")
    r.add_argument("--output", help="where to save the first output (.npy)")
    r.add_argument("--data", help="labelled set to evaluate: mnist, or an .npz with x and y")
    r.add_argument("--count", type=_COUNT, help="evaluate only the first N samples")
    r.add_argument("--emulate", action="store_true",
                   help="run a cross-compiled (aarch64) library here under qemu-user (installed on first use)")
    r.set_defaults(func=cmd_run)

    sc = sub.add_parser("schedules", help="each layer under each schedule (plain, default, tuned): table + plot")
    sc.add_argument("model", help="pkg.module:factory, .pt2 or .onnx")
    sc.add_argument("--input-shape", type=_shape, help="example input shape (batch first)")
    sc.add_argument("--data", help="take the input shape from this data instead")
    sc.add_argument("--plan", help="per-layer bits from `intforge plan` (default: INT8)")
    sc.add_argument("--target", default="x86")
    sc.add_argument("--repeat", type=_COUNT, default=10)
    sc.add_argument("-o", "--output", default="schedules.json")
    sc.set_defaults(func=cmd_schedules)

    b = sub.add_parser("bench", help="time a compiled model.so: warm-up, repeats, median and spread")
    b.add_argument("library")
    b.add_argument("--repeat", type=_COUNT, default=100)
    b.add_argument("--warmup", type=_NONNEGATIVE, default=10)
    b.add_argument("--threads", type=_COUNT,
                   help="worker threads (TVM_NUM_THREADS; default: one per physical core this process may use)")
    b.add_argument("--json", help="also write the numbers to this JSON file")
    b.add_argument("--rpc", metavar="HOST:PORT", help="time on a board running TVM's RPC server")
    b.add_argument("--tracker", metavar="HOST:PORT", help="time on a board handed out by a TVM RPC tracker")
    b.add_argument("--key", help="device key to request from the tracker (e.g. rpi5)")
    b.set_defaults(func=cmd_bench)

    cm = sub.add_parser("compare", help="intforge INT8 against ONNX Runtime INT8 on the same .onnx file (a "
                                        "PyTorch model is exported first): accuracy and latency, side by side")
    _model_args(cm)
    cm.add_argument("--data", help="set to score both on: mnist[:N], snippets[:N] (a text encoder's token ids and "
                                   "masks), or an .npz with x and y (default: "
                                   "the calibration samples, top-1 agreement with ORT FP32 only)")
    cm.add_argument("--count", type=_COUNT, help="score only the first N samples of --data")
    cm.add_argument("--threads", type=_COUNT, help="threads for both engines (default: one per physical core)")
    cm.add_argument("--rounds", type=_COUNT, default=10, help="timing rounds, engines in turns (default 10)")
    cm.add_argument("--repeat", type=_COUNT, default=20, help="timed calls per engine per round (default 20)")
    cm.add_argument("--untuned", action="store_true", help="ignore the target's tuning database")
    cm.add_argument("--json", help="also write the numbers to this JSON file")
    cm.add_argument("-o", "--output", default="build/compare", help="where both quantized models go")
    cm.set_defaults(func=cmd_compare)

    bs = sub.add_parser("board-server", help="an emulated ARM board (qemu) serving TVM RPC on loopback")
    bs.add_argument("--target", default="rpi5", help="ARM preset whose CPU qemu emulates (default rpi5)")
    bs.add_argument("--port", type=_int_at_least(1, 65535), default=9090)
    bs.add_argument("--tracker", metavar="HOST:PORT", help="register with this RPC tracker")
    bs.add_argument("--key", help="device key to register under (default: the preset's name)")
    bs.set_defaults(func=cmd_board_server)

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
