"""Target presets: a short name a user types, and the TVM target it stands for."""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm

from intforge.errors import IntforgeError


def host_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. 'znver4', 'sapphirerapids')."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


@dataclass(frozen=True)
class TargetPreset:
    """A named compilation target. `mcpu=None` means the host's CPU."""

    name: str
    description: str
    kind: str = "llvm"
    mcpu: str | None = None
    mtriple: str | None = None
    mattr: tuple[str, ...] = field(default_factory=tuple)

    def tvm_target(self) -> tvm.target.Target:
        spec: dict = {"kind": self.kind, "mcpu": self.mcpu or host_cpu()}
        if self.mtriple:
            spec["mtriple"] = self.mtriple
        if self.mattr:
            spec["mattr"] = list(self.mattr)
        return tvm.target.Target(spec)

    def describe(self) -> dict:
        return {"preset": self.name, "kind": self.kind, "mcpu": self.mcpu or host_cpu(),
                "mtriple": self.mtriple or "host", "mattr": list(self.mattr)}


PRESETS: dict[str, TargetPreset] = {
    "x86": TargetPreset("x86", "this x86-64 machine (LLVM, -mcpu of the host)"),
    "x86-generic": TargetPreset("x86-generic", "any x86-64-v2 CPU (portable, slower)", mcpu="x86-64-v2"),
}


def resolve_target(name: str | TargetPreset) -> TargetPreset:
    """Look up a preset by name; the error lists the presets that exist."""
    if isinstance(name, TargetPreset):
        return name
    if name not in PRESETS:
        known = ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
        raise IntforgeError(
            f"unknown target {name!r}. Available presets: {known}. ARM and CUDA presets are planned "
            "(see the README's roadmap)."
        )
    return PRESETS[name]
