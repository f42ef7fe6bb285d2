"""The build driver: integer program -> Relax -> verified integer-only -> scheduled -> model.so + model.json."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from intforge.errors import IntforgeError
from intforge.kernels import default_schedule_pass
from intforge.kernels.winograd import FLAVOURS as WINOGRAD_FLAVOURS
from intforge.program import IntegerProgram
from intforge.relay_passes import dot_product_layout_pass, emit_program, verify_integer_only
from intforge.relay_passes.inplace_residual import InplaceResidual
from intforge.relay_passes.nhwc_layout import nhwc_layout_pass
from intforge.relay_passes.residual_add import residual_add_pass
from intforge.relay_passes.tensor_core import tensor_core_kernels

from .manifest import manifest_path_for, sha256_file, versions, write_manifest
from .targets import TargetPreset, resolve_target
from .tuning import apply_database_pass


@dataclass
class Artifact:
    """What a build produced: the library, its manifest and the integer program beside them."""

    library: Path
    manifest_path: Path
    program_path: Path
    manifest: dict[str, Any]


def _kernel_passes(preset: TargetPreset | None, dot_kernels: bool = True) -> list[tvm.transform.Pass]:
    """The target's own kernels, chosen before TOPI legalizes what is left: the graph in NHWC, integer conv2d
    and dense tensorized to the CPU's dot-product instruction (x86 vpdpbusd; aarch64 usmmla/smmla with
    i8mm, else sdot, else NEON widening multiplies; x86 AVX2 vpmaddwd), or on x86 without AVX2 in the
    dot-product layout (widening multiply-adds from LLVM's vectorizer), and depthwise
    convs vectorized across channels. Off with `dot_kernels=False` (TOPI's NCHW)."""
    if preset is None or not dot_kernels:
        return []
    return [nhwc_layout_pass(), dot_product_layout_pass(shift_unsigned=shift_unsigned(preset),
                                                        blocked=blocked_kernels(preset), ifma=ifma_epilogues(preset),
                                                        winograd_convs=winograd_convs(preset),
                                                        amx=amx_kernels(preset)),
            residual_add_pass()]


def shift_unsigned(preset: TargetPreset) -> bool:
    """Whether the contiguous-layout kernels (grouped convs) run u8 activations as s8: sdot without usdot."""
    return preset.arch == "aarch64" and preset.has("dotprod") and not preset.has("i8mm")


def blocked_kernels(preset: TargetPreset) -> str | None:
    """The instruction family of the target's tensorized conv/dense kernels, None where it has none."""
    if preset.arch == "x86_64" and preset.has("avx512vnni") and preset.has("avx512bw"):
        return "vnni"
    if preset.arch == "x86_64" and preset.has("avx2"):
        return "avx2"
    if preset.arch == "aarch64" and preset.has("i8mm"):
        return "i8mm"
    if preset.arch == "aarch64":
        return "sdot" if preset.has("dotprod") else "neon"
    return None


def ifma_epilogues(preset: TargetPreset) -> bool:
    """Whether the VNNI convs' requantize runs as 52-bit multiply-adds (kernels/x86_ifma.py): AVX512-IFMA
    for `vpmadd52luq` and AVX512-VBMI for `vpermi2b` (Ice Lake, Sapphire Rapids, Zen 4 and later)."""
    return blocked_kernels(preset) == "vnni" and preset.has("avx512ifma") and preset.has("avx512vbmi")


def amx_kernels(preset: TargetPreset) -> bool:
    """Whether 1x1 convs, stride-1 3x3 convs and dense layers run on AMX's tiles (kernels/x86_amx.py): x86
    with AMX-INT8 (the `x86-amx` preset, or `x86` on such a CPU) and the VNNI kernels for the rest, unless
    INTFORGE_AMX=0 (to compare with the VNNI kernels)."""
    return (blocked_kernels(preset) == "vnni" and preset.has("amx-int8") and preset.has("amx-tile")
            and os.environ.get("INTFORGE_AMX", "1") != "0")


def winograd_convs(preset: TargetPreset) -> bool:
    """Whether 3x3 stride-1 convs run as exact integer Winograd F(4x4, 3x3) (kernels/winograd.py): where it
    has a flavour for the target's kernels (AVX512-VNNI `vpdpwssd`, AVX2 `vpmaddwd`), unless
    INTFORGE_WINOGRAD=0 (to compare with the direct kernel)."""
    return blocked_kernels(preset) in WINOGRAD_FLAVOURS and os.environ.get("INTFORGE_WINOGRAD", "1") != "0"


def in_place_residuals() -> bool:
    """Whether residual adds write over their shortcut where it dies there (relay_passes.inplace_residual),
    unless INTFORGE_INPLACE_RESIDUAL=0 (to compare)."""
    return os.environ.get("INTFORGE_INPLACE_RESIDUAL", "1") != "0"


def _legalize_passes(preset: TargetPreset | None = None, dot_kernels: bool = True) -> list[tvm.transform.Pass]:
    """The target's kernels, then TVM's CPU legalization minus FoldConstant: folding would unpack INT4
    weights at compile time and embed them as int8, undoing the packing. Our emitted graphs have nothing
    else worth folding."""
    return _kernel_passes(preset, dot_kernels) + [relax.transform.LegalizeOps(),
                                                  relax.transform.AnnotateTIROpPattern(),
                                                  relax.transform.FuseOps(), relax.transform.FuseTIR()]


def _pipeline(target: tvm.target.Target, database=None, default_schedule: bool = True,
              preset: TargetPreset | None = None, dot_kernels: bool = True) -> tvm.transform.Pass:
    """TVM's CPU pipeline: our legalization, tuned schedules from `database` where it has them, then the
    default schedule for the rest, then residual adds written over their dying shortcuts."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    @tvm.transform.module_pass(opt_level=0, name="intforge.CPUPipeline")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        inplace = InplaceResidual()
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + _legalize_passes(preset, dot_kernels)
                + ([inplace.find()] if in_place_residuals() else [])
                + ([apply_database_pass(database, target)] if database is not None else [])
                + ([default_schedule_pass(target)] if default_schedule else [])
                + [inplace.apply()]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _run


def _cuda_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CUDA pipeline, minus FoldConstant (it would unpack INT4 weights at compile time): our Tensor
    Core kernels arrive scheduled; DLight schedules what is left (pooling, residual adds, depthwise convs,
    the float boundary), short reductions such as depthwise convs one thread an output (kernels/cuda_generic)."""
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    from intforge.kernels.cuda_generic import ShortReduction

    @tvm.transform.module_pass(opt_level=0, name="intforge.CUDAPipeline")
    def _run(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FuseOps(), relax.transform.FuseTIR(),
                   dl.ApplyDefaultSchedule(ShortReduction(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                          dl.gpu.Fallback())]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return _run


def _compile_cuda(mod: tvm.IRModule, preset: TargetPreset) -> relax.VMExecutable:
    """Compile for a GPU with nvcc; works without a GPU (see intforge.cuda_env)."""
    import os

    from intforge.cuda_env import ensure_runtime, require_nvcc

    require_nvcc(preset.name)
    ensure_runtime()
    # nvrtc needs NVIDIA's Python bindings; nvcc is what a CUDA toolkit always has.
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    verify_integer_only(mod)
    tgt = preset.tvm_target()
    try:
        with tgt:
            return tvm.compile(mod, target=tgt, relax_pipeline=_cuda_pipeline(tgt))
    except Exception as exc:  # a TVM or nvcc failure here is our bug, not the user's: say so plainly
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IntforgeError(
            f"TVM failed to compile the integer program for GPU target '{preset.name}' ({preset.cuda_arch}): "
            f"{first}. This is an intforge bug; please report it with the model that triggered it."
        ) from exc


def compile_module(mod: tvm.IRModule, target: str | TargetPreset = "x86", tuned: bool = True,
                   default_schedule: bool = True, dot_kernels: bool = True) -> relax.VMExecutable:
    """Verify a Relax module is integer-only, then compile it for `target`, with the target's tuning
    database (from `intforge tune`) when one exists and `tuned`, and the default schedule for the rest
    unless `default_schedule` is off (plain TVM lowering: one thread, no schedule)."""
    from .tuning import open_database

    preset = resolve_target(target)
    if preset.is_cuda:
        return _compile_cuda(mod, preset)
    return _compile(mod, preset, open_database(preset) if tuned else None, default_schedule, dot_kernels)


def _compile(mod: tvm.IRModule, preset: TargetPreset, database, default_schedule: bool,
             dot_kernels: bool = True) -> relax.VMExecutable:
    from .tuning import _tuning_target

    verify_integer_only(mod)
    # The database's keys carry the tuning target (with num-cores): build under the same one.
    tgt = _tuning_target(preset) if database is not None else preset.tvm_target()
    try:
        return tvm.compile(mod, target=tgt, relax_pipeline=_pipeline(tgt, database, default_schedule, preset,
                                                                      dot_kernels))
    except Exception as exc:  # a TVM failure here is our bug, not the user's: say so plainly
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IntforgeError(
            f"TVM failed to compile the integer program for target '{preset.name}': {first}. This is an "
            "intforge bug; please report it with the model that triggered it."
        ) from exc


def module_source(executable, kind: str, fmt: str = "") -> str:
    """The source (`fmt`, as TVM's inspect_source takes it) of every module of `kind` in a compiled
    executable: "cuda" gives the CUDA C nvcc compiled into the .so, ("llvm", "ll") the host's LLVM IR."""
    found = []

    def walk(m) -> None:
        if m.kind == kind:
            found.append(m.inspect_source(fmt))
        for i in m.imports:
            walk(i)

    walk(executable.mod)
    return "\n".join(found)


def cuda_source(executable) -> str:
    """The CUDA C of every GPU kernel in a compiled executable (what nvcc compiled into the .so)."""
    return module_source(executable, "cuda")


def _io_spec(program: IntegerProgram, names: list[str], boundary: str, io_layout: str = "NCHW") -> list[dict[str, Any]]:
    from intforge.relay_passes.emit import boundary_shape

    rows = []
    for n in names:
        t = program.tensors[n]
        rows.append({"name": n, "shape": list(boundary_shape(t.shape, io_layout)),
                     "dtype": "float32" if boundary == "float" and t.index_dtype is None else t.dtype,
                     "quantized_dtype": t.dtype, "scale": t.scale, "zero_point": t.zero_point})
        if t.index_range is not None:  # token ids, a mask: the integers the caller may pass
            rows[-1]["range"] = [int(v) for v in t.index_range]
    return rows


def build(program: IntegerProgram, output: str | Path, target: str | TargetPreset = "x86",
          boundary: str = "float", extra: dict[str, Any] | None = None, tuned: bool = True,
          default_schedule: bool = True, dot_kernels: bool = True, io_layout: str = "NCHW") -> Artifact:
    """Compile `program` into `output` (a path ending in .so, or a directory that gets model.so).
    `io_layout="NHWC"` makes 4-D inputs and outputs NHWC at the library's boundary (see emit_program)."""
    output = Path(output)
    so_path = output if output.suffix == ".so" else output / "model.so"
    try:
        so_path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:
        raise IntforgeError(f"cannot write the model into {so_path.parent}: {exc.strerror}. Give a directory (or "
                            "a path ending in .so) that can be created there") from None
    preset = resolve_target(target)

    program.validate()
    t0 = time.perf_counter()
    if preset.is_cuda:
        fcompile = preset.fcompile()  # checks nvcc first: a clear error before any work
        mod = emit_program(program, boundary=boundary,
                           gemm_kernel=tensor_core_kernels(preset.has("int4-tensor-core")) if dot_kernels else None)
        database = None
        ex = _compile_cuda(mod, preset)
        kernels = (("Tensor Core mma.sync: int8 m8n8k16" + (", int4 m8n8k32" if preset.has("int4-tensor-core")
                                                            else "; INT4 layers widened to int8"))
                   if dot_kernels else "DLight generic")
    else:
        from .tuning import open_database

        fcompile = preset.fcompile()
        mod = emit_program(program, boundary=boundary, io_layout=io_layout)
        database = open_database(preset) if tuned else None  # None also when a corrupt one was set aside
        ex = _compile(mod, preset, database, default_schedule, dot_kernels)
        kernels = "dot-product layout (conv2d, dense)" if dot_kernels else "TOPI"
    # Debug info is a third of the file and nobody steps through generated kernels: leave it out.
    ex.export_library(str(so_path), fcompile=fcompile, options=["-Wl,--strip-debug"])
    build_s = time.perf_counter() - t0

    extra = dict(extra or {})
    if preset.is_cuda:  # the generated kernels, for `nvcc -ptx` / cuobjdump and for the curious
        cu_path = so_path.with_suffix(".cu")
        cu_path.write_text(cuda_source(ex))
        extra["cuda_source"] = cu_path.name

    prog_path = so_path.with_suffix(".iprog")
    program.save(prog_path)
    manifest = {
        "library": so_path.name,
        "library_sha256": sha256_file(so_path),
        "program": prog_path.name,
        "program_sha256": sha256_file(prog_path),
        "function": "main",
        "boundary": boundary,
        "integer_only": True,
        "float_boundary": (["input quantize (x * 1/scale, round half to even, clamp)",
                            "output dequantize (q * scale)"] if boundary == "float" else []),
        "inputs": _io_spec(program, program.inputs, boundary, io_layout),
        "outputs": _io_spec(program, program.outputs, boundary, io_layout),
        "io_layout": io_layout,
        "layers": program.layers(),
        "weight_bytes": sum(r["weight_bytes"] for r in program.layers()),
        # (embedding tables, int8: not layers a bit plan chooses for, but bytes the library carries)
        "table_bytes": sum(int(op.params["table"].nbytes) for op in program.ops if op.kind == "embedding"),
        "target": preset.describe(),
        "versions": versions(),
        "build_seconds": round(build_s, 3),
        "kernels": kernels,
        "schedule": ("tuned (MetaSchedule database) + " if database is not None else "")
        + ("DLight (GPU)" if preset.is_cuda else "default" if default_schedule else "none (plain lowering)"),
        **extra,
    }
    man_path = write_manifest(manifest_path_for(so_path), manifest)
    return Artifact(so_path, man_path, prog_path, manifest)
