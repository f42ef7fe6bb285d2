"""intforge.compiler: target presets, the build driver, .so export and its manifest."""

from .build import Artifact, build, compile_module
from .targets import PRESETS, TargetPreset, resolve_target

__all__ = ["Artifact", "build", "compile_module", "PRESETS", "TargetPreset", "resolve_target"]
