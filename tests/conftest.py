"""Shared test helpers: build a program into a real .so, load it, compare it with the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import intforge
from intforge import reference
from intforge.compiler import build


def quantize_module(module: torch.nn.Module, shape: tuple[int, ...], n_calib: int = 16, seed: int = 0,
                    scale: float = 1.0, calibration: str = "minmax", quant=None):
    """Quantize a small module on random calibration data; returns the integer program."""
    rng = np.random.default_rng(seed)
    calib = (rng.standard_normal((n_calib, *shape[1:])) * scale).astype(np.float32)
    example = torch.from_numpy(calib[: shape[0]].copy())
    program, _ = intforge.quantize_model(module.eval(), (example,), calib, calibration=calibration, quant=quant)
    return program


def extreme_int_inputs(program, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Random integers over the full range, and every input at its min, max, zero, and alternating (an integer
    input, token ids or a mask, over the values it takes)."""
    cases = []
    specs = [program.tensors[n] for n in program.inputs]
    bounds = [t.index_range or (t.qmin, t.qmax) for t in specs]  # (token ids, masks: the values they take)
    for _ in range(2):
        cases.append([rng.integers(lo, hi + 1, t.shape).astype(t.dtype)
                      for t, (lo, hi) in zip(specs, bounds, strict=True)])
    for fill in ("min", "max", "zero", "alt"):
        case = []
        for t, (lo, hi) in zip(specs, bounds, strict=True):
            if fill == "alt":
                a = np.where(np.indices(t.shape).sum(axis=0) % 2 == 0, hi, lo)
            else:
                a = np.full(t.shape, {"min": lo, "max": hi, "zero": max(lo, 0)}[fill])
            case.append(a.astype(t.dtype))
        cases.append(case)
    return cases


@pytest.fixture
def so_of(tmp_path):
    """so_of(program, boundary) -> loaded CompiledModel built into a fresh temp directory."""
    counter = iter(range(1000))

    def _build(program, boundary: str = "int"):
        art = build(program, tmp_path / f"m{next(counter)}", boundary=boundary)
        return intforge.load(art.library)

    return _build


def intforge_cli(*args, check=True, env=None):
    """Run `python -m intforge.cli ARGS` as a user would; fail with its output unless it succeeds."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "intforge.cli", *args], capture_output=True, text=True,
                          timeout=900, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"intforge {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_bit_exact_int(program, lib, seed: int = 0) -> None:
    """The .so (integer boundary) equals the reference on random and extreme integer inputs."""
    rng = np.random.default_rng(seed)
    for case in extreme_int_inputs(program, rng):
        got = lib(*case)
        got = got if isinstance(got, tuple) else (got,)
        want = reference.run_int(program, *case)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)


def run_fresh_python(script: str, *args: str, unset: tuple[str, ...] = (), affinity: set[int] | None = None,
                     **env: str) -> dict:
    """Run `script` in a fresh Python process (the variables `unset` removed from the environment, `env`
    added, CPU affinity `affinity`) and return the JSON its last line prints."""
    base = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env={**base, **env}, check=False,
                          preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
