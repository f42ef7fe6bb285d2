"""Target presets: a short name a user types, and the TVM target it stands for."""

from __future__ import annotations

import functools
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from intforge.errors import IntforgeError


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. 'znver4', 'sapphirerapids')."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


# LLVM features a hypervisor's CPU model can hide from LLVM's name for the host CPU while the CPU (and
# Linux) has them: /proc/cpuinfo's flag for each. Seen 2026-12-07: a KVM guest on an Intel Xeon with
# AMX-INT8 reported family 6 model 167, which LLVM names 'rocketlake' (no AMX).
HOST_FLAGS = {"amx-tile": "amx_tile", "amx-int8": "amx_int8"}


def extra_features(flags: set[str], cpu: str) -> tuple[str, ...]:
    """'+feature' for each of HOST_FLAGS in the CPU's `flags` (as /proc/cpuinfo lists them) that LLVM's CPU
    `cpu` lacks."""
    named = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    return tuple(f"+{feature}" for feature, flag in HOST_FLAGS.items()
                 if flag in flags and not tvm.target.codegen.target_has_features(feature, named))


@functools.cache
def host_extra_features() -> tuple[str, ...]:
    """`extra_features` of this machine (Linux; none where /proc/cpuinfo cannot be read)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return extra_features(set(flags), host_cpu())


def host_arch() -> str:
    """'x86_64' or 'aarch64': the architecture libraries built for 'the host' run on."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@dataclass(frozen=True)
class TargetPreset:
    """A named compilation target. `mcpu=None` means the host's CPU; `mtriple=None` means the host's
    triple. Cross targets name the C++ cross compiler that links the .so and the qemu CPU model that
    emulates the board (one without the board's missing features, so a stray instruction traps)."""

    name: str
    description: str
    kind: str = "llvm"
    mcpu: str | None = None
    mtriple: str | None = None
    mattr: tuple[str, ...] = field(default_factory=tuple)
    arch: str = "x86_64"
    cross_compiler: str | None = None
    qemu_cpu: str | None = None
    cuda_arch: str | None = None  # "sm_75": the GPU a "cuda" preset compiles for (host code runs on the CPU)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def sm(self) -> int:
        """The compute capability as an integer (75 for sm_75); 0 for CPU targets."""
        return int(self.cuda_arch.removeprefix("sm_").rstrip("a")) if self.cuda_arch else 0

    def tvm_target(self) -> tvm.target.Target:
        if self.is_cuda:
            host = tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()})
            return tvm.target.Target({"kind": "cuda", "arch": self.cuda_arch}, host=host)
        spec: dict = {"kind": self.kind, "mcpu": self.mcpu or host_cpu()}
        if self.mtriple:
            spec["mtriple"] = self.mtriple
        mattr = self.all_mattr()
        if mattr:
            spec["mattr"] = mattr
        return tvm.target.Target(spec)

    def all_mattr(self) -> list[str]:
        """The preset's mattr, and for the host's own preset what LLVM's name for its CPU hides
        (`host_extra_features`)."""
        return list(self.mattr) + (list(host_extra_features()) if self.mcpu is None and not self.is_cross else [])

    def describe(self) -> dict:
        d = {"preset": self.name, "kind": self.kind, "mcpu": self.mcpu or host_cpu(),
             "mtriple": self.mtriple or "host", "mattr": self.all_mattr(), "arch": self.arch}
        if self.is_cuda:
            d.update({"device": "cuda", "cuda_arch": self.cuda_arch})
        return d

    @property
    def is_cross(self) -> bool:
        """True when the library cannot run on this machine (another architecture)."""
        return self.arch != host_arch()

    def has(self, feature: str) -> bool:
        """Whether the target has an LLVM feature ('dotprod', 'i8mm', 'avx512vnni', ...), from its mattr and
        what LLVM knows its mcpu to have; for GPUs, 'int8-tensor-core' (sm_75+) and 'int4-tensor-core'
        (sm_75 to sm_89: Hopper dropped INT4 mma)."""
        if self.is_cuda:
            return {"int8-tensor-core": self.sm >= 75, "int4-tensor-core": 75 <= self.sm < 90}.get(feature, False)
        return bool(tvm.target.codegen.target_has_features(feature, self.tvm_target()))

    def fcompile(self):
        """The function `export_library` links with: the system compiler, or the cross compiler, checked
        to exist so a missing toolchain is an instruction rather than a traceback from deep inside TVM."""
        if self.is_cuda:
            from intforge.cuda_env import require_nvcc

            require_nvcc(self.name)
            return None
        if not self.cross_compiler:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise IntforgeError(
                f"target '{self.name}' links with {self.cross_compiler}, which is not installed. On Debian or "
                f"Ubuntu: `sudo apt-get install g++-{self.mtriple}` (the package that provides "
                f"{self.cross_compiler}), then compile again."
            )
        return tvm.support.cc.cross_compiler(self.cross_compiler)


def _arm(name: str, description: str, mcpu: str, mattr: tuple[str, ...], qemu_cpu: str) -> TargetPreset:
    return TargetPreset(name, description, mcpu=mcpu, mtriple="aarch64-linux-gnu", mattr=mattr, arch="aarch64",
                        cross_compiler="aarch64-linux-gnu-g++", qemu_cpu=qemu_cpu)


def _gpu(name: str, description: str, arch: str | None) -> TargetPreset:
    return TargetPreset(name, description, kind="cuda", arch=host_arch(), cuda_arch=arch)


PRESETS: dict[str, TargetPreset] = {
    "x86": TargetPreset("x86", "this x86-64 machine (LLVM, -mcpu of the host)"),
    "x86-amx": TargetPreset("x86-amx", "Intel Xeon with AMX-INT8 (Sapphire Rapids and later: tile kernels for "
                            "1x1 and 3x3 convs and linears, AVX512-VNNI for the rest)", mcpu="sapphirerapids"),
    "x86-avx2": TargetPreset("x86-avx2", "any x86-64 CPU with AVX2 (Haswell and later, Zen 1-3: vpmaddwd kernels)",
                             mcpu="haswell"),
    "x86-generic": TargetPreset("x86-generic", "any x86-64-v2 CPU (portable, slower)", mcpu="x86-64-v2"),
    "arm64": _arm("arm64", "any ARMv8-A with NEON, no dot product", "generic", ("+neon",), "cortex-a57"),
    "arm64-dotprod": _arm("arm64-dotprod", "ARMv8.2-A with NEON sdot/udot", "generic", ("+neon", "+dotprod"),
                          "cortex-a76"),
    "rpi5": _arm("rpi5", "Raspberry Pi 5 (Cortex-A76, sdot/udot)", "cortex-a76", ("+neon", "+dotprod"),
                 "cortex-a76"),
    "rpi4": _arm("rpi4", "Raspberry Pi 4 (Cortex-A72, NEON, no dot product)", "cortex-a72", ("+neon",),
                 "cortex-a72"),
    "graviton": _arm("graviton", "AWS Graviton3 (Neoverse V1, sdot + i8mm usdot/smmla)", "neoverse-v1",
                     ("+neon", "+dotprod", "+i8mm"), "max"),
    "t4": _gpu("t4", "NVIDIA T4 / Turing (sm_75: INT8 and INT4 Tensor Cores)", "sm_75"),
    "a100": _gpu("a100", "NVIDIA A100 / Ampere (sm_80: INT8 and INT4 Tensor Cores)", "sm_80"),
    "h100": _gpu("h100", "NVIDIA H100 / Hopper (sm_90: INT8 Tensor Cores; INT4 layers run on them unpacked)",
                 "sm_90"),
    "cuda": _gpu("cuda", "this machine's NVIDIA GPU (its own sm_XY)", None),
}


def resolve_target(name: str | TargetPreset) -> TargetPreset:
    """Look up a preset by name; the error lists the presets that exist."""
    if isinstance(name, TargetPreset):
        return name
    if name not in PRESETS:
        known = ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
        raise IntforgeError(f"unknown target {name!r}. Available presets: {known}.")
    preset = PRESETS[name]
    if preset.is_cuda and preset.cuda_arch is None:  # 'cuda': the local GPU, found now
        from dataclasses import replace

        from intforge.cuda_env import local_arch

        preset = replace(preset, cuda_arch=local_arch())
    return preset
