"""Run aarch64 model libraries on an x86 machine under Debian's qemu-user.

The board side is assembled once into the cache (`$INTFORGE_CACHE` or ~/.cache/intforge): Debian's arm64
python3.11 and the C/C++ runtime libraries it needs, fetched with `apt-get download` against a private
package list (the system's apt configuration is not touched), plus the aarch64 wheels of apache-tvm,
apache-tvm-ffi and numpy at exactly the versions installed here. The TVM compiler library is dropped from
it: the board side only loads libraries (`TVM_USE_RUNTIME_LIB=1`), as a real board would.

qemu runs each preset's own CPU model (Cortex-A72 for rpi4, ...), so an instruction the board lacks
traps instead of passing unnoticed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .cache import cache_root
from .errors import IntforgeError
from .runtime import CompiledModel

RUNNER = Path(__file__).with_name("_board_runner.py")

# Debian bookworm arm64 packages: python3.11 and what its interpreter and stdlib extension modules link.
DEBS = ("libc6", "libgcc-s1", "libstdc++6", "python3.11-minimal", "libpython3.11-minimal",
        "libpython3.11-stdlib", "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5",
        "libsqlite3-0", "libuuid1", "libcrypt1")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
# Board-side wheels (the runtime, and what TVM's RPC server imports), pinned to the versions installed on
# this machine so both sides agree.
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "typing_extensions", "cloudpickle", "psutil")
# Not needed to load and run libraries: the 240 MB compiler, and CUDA.
DROP = ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so", "tvm/lib/libtvm.so")


class EmulationUnavailable(IntforgeError):
    """qemu-user or the arm64 board sysroot cannot be had on this machine; the message says why and how."""


def _pins() -> list[str]:
    return [f"{w}=={importlib.metadata.version(w)}" for w in WHEELS]


# The board's `python3`: qemu running the arm64 interpreter with argv[0] set to this script, so that
# sys.executable names it and Python subprocesses (TVM's RPC server forks workers) are emulated too.
# qemu reads the sysroot and CPU model from QEMU_LD_PREFIX and QEMU_CPU, which children inherit.
WRAPPER = """#!/bin/sh
exec "${INTFORGE_QEMU:-qemu-aarch64}" -0 "$0" "$(dirname "$0")/python3.11" "$@"
"""


def _key() -> str:
    return hashlib.sha256(json.dumps([DEBS, _pins(), DROP, WRAPPER]).encode()).hexdigest()[:12]


def qemu_binary() -> str:
    """Path of qemu-aarch64, or an EmulationUnavailable saying how to install it."""
    for name in ("qemu-aarch64", "qemu-aarch64-static"):
        path = shutil.which(name)
        if path:
            return path
    raise EmulationUnavailable("qemu-aarch64 is not installed. On Debian or Ubuntu: `sudo apt-get install "
                               "qemu-user` (`make test` does this itself when run as root).")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise EmulationUnavailable(f"could not {what}: `{' '.join(cmd[:4])} ...` failed: {' | '.join(tail)}")


def _fetch_debs(dest: Path, work: Path) -> None:
    if shutil.which("apt-get") is None:
        raise EmulationUnavailable("building the arm64 sysroot needs Debian's apt-get (to download python3.11 "
                                   "for arm64); this machine has none")
    lists, cache = work / "lists", work / "cache"
    for d in (lists / "partial", cache / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    opts = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}", "-o", "APT::Architecture=arm64",
            "-o", "APT::Architectures::=arm64", "-o", "Debug::NoLocking=1", "-q"]
    _run(["apt-get", *opts, "update"], "read Debian's arm64 package lists")
    debs = work / "debs"
    debs.mkdir()
    _run(["apt-get", *opts, "download", *DEBS], "download arm64 python3.11 packages", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"unpack {deb.name}")


def _fetch_wheels(site: Path, work: Path) -> None:
    wheels = work / "wheels"
    plat = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *plat,
          "--python-version", "3.11", "-d", str(wheels), *_pins()], "download the aarch64 wheels of "
         + ", ".join(_pins()))
    site.mkdir(parents=True)
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                if info.filename not in DROP:
                    z.extract(info, site)


def sysroot() -> Path:
    """The arm64 board sysroot, built on first use (about 100 MB of downloads) and reused after."""
    root = cache_root() / f"arm64-sysroot-{_key()}"
    if (root / ".complete").exists():
        return root
    qemu_binary()
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="arm64-sysroot-", dir=cache_root()))
    try:
        dest = tmp / "root"
        dest.mkdir()
        _fetch_debs(dest, tmp)
        _fetch_wheels(dest / "site", tmp)
        wrapper = dest / "usr" / "bin" / "python3-board"
        wrapper.write_text(WRAPPER)
        wrapper.chmod(0o755)
        (dest / ".complete").write_text(json.dumps({"debs": DEBS, "wheels": _pins()}))
        for old in cache_root().glob("arm64-sysroot-*"):  # other versions' sysroots, and this one half-built
            if old != tmp:
                shutil.rmtree(old, ignore_errors=True)
        dest.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def board_command(qemu_cpu: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run `python3.11 args...` on the emulated board."""
    root = sysroot()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    env.update({"TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(root / "site"), "PYTHONNOUSERSITE": "1",
                "QEMU_LD_PREFIX": str(root), "QEMU_CPU": qemu_cpu, "INTFORGE_QEMU": qemu_binary()})
    return [str(root / "usr" / "bin" / "python3-board"), *args], env


def run_library(library: str | Path, batches: list[np.ndarray], qemu_cpu: str = "max",
                timeout: float = 1800) -> list[np.ndarray]:
    """Run `library` on the emulated board once per leading index of the `batches` arrays (one array per
    model input, shaped (n, *input_shape)); returns one (n, *output_shape) array per output."""
    with tempfile.TemporaryDirectory(prefix="intforge-emu-") as d:
        src, dst = Path(d) / "in.npz", Path(d) / "out.npz"
        np.savez(src, **{f"in{i}": np.ascontiguousarray(a) for i, a in enumerate(batches)})
        cmd, env = board_command(qemu_cpu, str(RUNNER), str(library), str(src), str(dst))
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-6:])
            hint = (" (SIGILL: the library uses an instruction this CPU lacks: was it compiled for another "
                    "preset?)" if res.returncode in (-4, 132) else "")
            raise IntforgeError(f"the library failed on the emulated board ({qemu_cpu}){hint}:\n{tail}")
        with np.load(dst) as z:
            return [z[f"out{i}"] for i in range(len(z.files))]


class EmulatedModel(CompiledModel):
    """A cross-compiled model.so run under qemu, with the same checks as a native load."""

    def __init__(self, library: Path, manifest: dict[str, Any]) -> None:  # noqa: D107 - nothing to dlopen here
        from .compiler.targets import resolve_target

        self.library, self.manifest = library, manifest
        preset = manifest.get("target", {}).get("preset", "arm64")
        try:
            self.qemu_cpu = resolve_target(preset).qemu_cpu or "max"
        except IntforgeError:
            self.qemu_cpu = "max"

    def time(self, repeat: int = 50, warmup: int = 5) -> dict[str, float]:
        raise IntforgeError(f"{self.library.name} is built for {self.manifest['target'].get('arch')}: timings "
                            "under emulation mean nothing. Time it on the board with `intforge bench "
                            f"{self.library} --rpc HOST:PORT`.")

    def run_many(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run every batch of `arrays` (n * batch samples per input) in one emulator start, returning the
        outputs concatenated over samples (the emulator takes seconds to start: batch your calls)."""
        b = self.batch_size
        n = len(np.asarray(arrays[0]))
        if n % b:
            raise IntforgeError(f"{n} samples do not fill whole batches of {b} (the batch {self.library.name} "
                                "was compiled for)")
        if len(arrays) != len(self.inputs):
            self._check(tuple(arrays))  # raises the count error
        per_batch = [np.asarray(a).reshape(n // b, b, *np.asarray(a).shape[1:]) for a in arrays]
        if n:  # the same shape and dtype checks as a native call, on the first batch
            self._check(tuple(x[0] for x in per_batch))
        per_batch = [x.astype(np.float32) if s["dtype"] == "float32" else x
                     for s, x in zip(self.inputs, per_batch, strict=True)]
        outs = run_library(self.library, per_batch, self.qemu_cpu)
        return [o.reshape(-1, *o.shape[2:]) for o in outs]

    def __call__(self, *args: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        outs = [o[: self.batch_size] for o in self.run_many(*args)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmulatedRPCServer:
    """TVM's RPC server running on an emulated aarch64 board on loopback: what `bench --rpc` talks to in
    tests, and a way to try the board workflow without a board. Use as a context manager."""

    def __init__(self, qemu_cpu: str = "max", port: int | None = None, tracker: str | None = None,
                 key: str | None = None) -> None:
        self.qemu_cpu, self.port, self.tracker, self.key = qemu_cpu, port or free_port(), tracker, key
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> EmulatedRPCServer:
        args = ["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(self.port),
                "--port-end", str(self.port + 1)]
        if self.tracker:  # register with a tracker under `key`, as a board in a fleet would
            args += ["--tracker", self.tracker, "--key", self.key or "arm64"]
        cmd, env = board_command(self.qemu_cpu, *args)
        # A session of its own: the server forks workers, and stopping must stop them all.
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise IntforgeError(f"the emulated RPC server exited: {out.strip()[-500:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.5)
        self.__exit__()
        raise IntforgeError("the emulated RPC server did not start listening within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            stop_process_group(self.proc)


def stop_process_group(proc: subprocess.Popen) -> None:
    """Terminate a process started with start_new_session=True and everything it forked."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
