"""Load a deployed model.so (checked against its manifest) and run it."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import pool
from .dyadic import refuse_nan
from .errors import ArtifactError, IntforgeError
from .program import IntegerProgram, check_index_values
from .threads import Placement, note_tvm_pool, placed


def _load_fresh(library: Path):
    """tvm.runtime.load_module on a private copy (dlopen caches by path, so a library rebuilt at the same
    path in the same process would otherwise silently run the old code), and whether its parallel loops
    run on intforge's pool (`pool.install`)."""
    import os
    import shutil
    import tempfile

    import tvm

    fd, tmp = tempfile.mkstemp(suffix=".so", prefix="intforge-")
    os.close(fd)
    try:
        shutil.copyfile(library, tmp)
        module = tvm.runtime.load_module(tmp)
        return module, pool.install(tmp)  # its parallel loops on intforge's pool (pool.py), where it can
    finally:
        os.unlink(tmp)  # the mapping stays valid after unlink


def check_inputs(name: str, specs: list[dict[str, Any]], args: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """Check call arguments against the manifest's input specs (count, shape, dtype); floats are cast to
    float32, integers must match exactly (an integer boundary never converts silently)."""
    if len(args) != len(specs):
        raise IntforgeError(f"{name} takes {len(specs)} input(s) ({', '.join(i['name'] for i in specs)}), "
                            f"got {len(args)}")
    out = []
    for spec, a in zip(specs, args, strict=True):
        a = np.asarray(a)
        if tuple(a.shape) != tuple(spec["shape"]):
            raise IntforgeError(f"input '{spec['name']}' has shape {tuple(a.shape)}; {name} was compiled for "
                                f"{tuple(spec['shape'])}")
        if spec["dtype"] == "float32":
            a = a.astype(np.float32, copy=False)
            refuse_nan(spec["name"], a)
        elif "range" in spec:  # token ids, a mask: any integers in range, as the library's dtype
            a = check_index_values(spec["name"], a, spec["dtype"], *spec["range"], error=IntforgeError)
        elif a.dtype != np.dtype(spec["dtype"]):
            raise IntforgeError(f"input '{spec['name']}' has dtype {a.dtype}; {name} takes {spec['dtype']} "
                                "(integer boundary)")
        out.append(np.ascontiguousarray(a))
    return out


def check_timing(repeat: int, warmup: int) -> None:
    """`time`'s counts: at least one timed run (statistics of none are undefined), no negative warm-up."""
    if int(repeat) < 1 or int(warmup) < 0:
        raise IntforgeError(f"timing needs repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")


def latency_stats(ms: list[float] | np.ndarray, repeat: int, warmup: int) -> dict[str, float]:
    """Median, mean, std, min, p10 and p90 of per-run milliseconds: what `bench` reports, local or remote."""
    ts = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(ts)), "mean_ms": float(np.mean(ts)), "std_ms": float(np.std(ts)),
            "min_ms": float(np.min(ts)), "p10_ms": float(np.percentile(ts, 10)),
            "p90_ms": float(np.percentile(ts, 90)), "repeat": repeat, "warmup": warmup}


def random_inputs(specs: list[dict[str, Any]], seed: int = 0) -> list[np.ndarray]:
    """One random array per input spec (normal floats, or integers over the dtype's range): timing inputs."""
    rng = np.random.default_rng(seed)
    ins = []
    for spec in specs:
        if spec["dtype"] == "float32":
            ins.append(rng.standard_normal(spec["shape"]).astype(np.float32))
        elif "range" in spec:  # token ids, a mask: values the library takes
            lo, hi = spec["range"]
            ins.append(rng.integers(lo, hi + 1, spec["shape"]).astype(spec["dtype"]))
        else:
            info = np.iinfo(spec["dtype"])
            ins.append(rng.integers(info.min, info.max + 1, spec["shape"]).astype(spec["dtype"]))
    return ins


def _device_for(library: Path, target: dict[str, Any]):
    """The device a library runs on: the CPU, or GPU 0 after checking there is one that can run its code
    (SASS for sm_XY runs on sm_XZ with Z >= Y, same major)."""
    import tvm

    if target.get("device") != "cuda":
        return tvm.cpu()
    from . import cuda_env

    cuda_env.ensure_runtime()
    built = str(target.get("cuda_arch", "sm_?"))
    where = f"{library} was compiled for an NVIDIA GPU ({target.get('preset')}, {built})"
    if not cuda_env.gpu_available():
        raise ArtifactError(f"{where} and this machine has no CUDA GPU (or no NVIDIA driver). Run it on a machine "
                            "with that GPU; building it needed none.")
    have = "sm_" + str(tvm.cuda(0).compute_version).replace(".", "")
    b, h = built.removeprefix("sm_"), have.removeprefix("sm_")
    if not (b[:-1] == h[:-1] and int(b[-1]) <= int(h[-1])):
        raise ArtifactError(f"{where}, but GPU 0 here is {have} ({tvm.cuda(0).device_name}), which cannot run "
                            f"{built} code. Recompile with --target cuda (this GPU) on this machine.")
    return tvm.cuda(0)


class CompiledModel:
    """A loaded model.so: call it with numpy arrays, get numpy arrays back."""

    def __init__(self, library: Path, manifest: dict[str, Any]) -> None:
        from tvm import relax

        self.library = library
        self.manifest = manifest
        self.device = _device_for(library, manifest.get("target", {}))
        self.on_gpu = manifest.get("target", {}).get("device") == "cuda"
        try:
            self._lib, own_pool = _load_fresh(library)
            self._vm = relax.VirtualMachine(self._lib, self.device)
        except Exception as exc:  # noqa: BLE001 - any load failure means an unusable library
            raise ArtifactError(
                f"cannot load {library} as a TVM library: {str(exc).strip().splitlines()[-1]}. Was it built "
                f"for this machine (target {manifest.get('target', {}).get('mcpu')})?"
            ) from None
        self._fn = self._vm[manifest.get("function", "main")]
        #: the pool its parallel loops run on: "intforge" (pool.py) or "tvm"
        self.thread_pool = "intforge" if own_pool else "tvm"
        if not own_pool and not self.on_gpu:
            note_tvm_pool()
        # Input tensors made once and refilled on every call: a fresh tensor a call cost MobileNetV2 85 us
        # against 35 us for a copy into this one (new pages each time), in a 2.0 ms call. The lock lets
        # one call in at a time: TVM's VM is not reentrant (entered twice at once, it fails inside), and
        # two calls would refill each other's inputs.
        self._inputs: list | None = None
        self._input_views: list[np.ndarray] | None = None
        self._call_lock = threading.Lock()
        self._placement = None if self.on_gpu else Placement(own_pool=own_pool)

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]

    @property
    def batch_size(self) -> int:
        return int(self.inputs[0]["shape"][0])

    def _check(self, args: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        return check_inputs(self.library.name, self.inputs, args)

    def __call__(self, *args: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        import tvm

        arrays = self._check(args)
        with self._call_lock:
            if self._inputs is None:
                self._inputs = [tvm.runtime.tensor(a, self.device) for a in arrays]
                # On the CPU, numpy views of the input tensors (DLPack, no copy): np.copyto refills one
                # at memcpy speed, 14 us for MobileNetV2's 224x224x3 floats where Tensor.copyfrom takes 22.
                self._input_views = None if self.on_gpu else [np.from_dlpack(t) for t in self._inputs]
            elif self._input_views is not None:
                for view, a in zip(self._input_views, arrays, strict=True):
                    np.copyto(view, a)
            else:
                for t, a in zip(self._inputs, arrays, strict=True):
                    t.copyfrom(a)
            placement = self._placement
            entered = placement.enter() if placement is not None else None
            try:
                res = self._fn(*self._inputs)
            finally:
                if placement is not None:
                    placement.exit(entered)
            if len(self.outputs) == 1:
                return self._numpy(res)
            return tuple(self._numpy(r) for r in res)

    def _placed(self) -> contextlib.AbstractContextManager:
        """On the CPU, the pool's workers pinned and this thread off their cores for the call
        (`threads.Placement`, which `__call__` runs inline: a generator costs a cold call 20 us): each
        kernel splits its work evenly, so one core shared by two of its threads halves the speed; a call
        that finds a worker's core taken by something else sets the workers free for a while."""
        return placed(self._placement)

    def _numpy(self, t) -> np.ndarray:
        """A result as a numpy array of its own. On the CPU through DLPack and one copy: 1 us for
        MobileNetV2's 1000 logits where `Tensor.numpy()` takes 10 (a fifth of the MNIST demo's call). The
        copy (well under a microsecond) keeps a result apart from the library's memory, which a view of
        it would share: none of our models return one, but a result that aliased the input tensors
        refilled on every call would change under the caller."""
        if self.on_gpu:
            return t.numpy()
        return np.from_dlpack(t).copy()

    def time(self, repeat: int = 50, warmup: int = 5, resident: bool = False) -> dict[str, float]:
        """Latency statistics in milliseconds (median, mean, std, min, p10, p90) on random inputs, each call
        as a user makes it (numpy in, numpy out). On a GPU, or with `resident`, the inputs stay on the
        device and TVM's time evaluator times the library's function alone (GPU: synchronized)."""
        import time as _time

        import tvm

        check_timing(repeat, warmup)
        ins = random_inputs(self.inputs)
        if self.on_gpu or resident:
            args = [tvm.runtime.tensor(a, self.device) for a in self._check(tuple(ins))]
            with self._call_lock, self._placed():
                for _ in range(warmup):
                    self._fn(*args)
                timer = self._vm.time_evaluator(self.manifest.get("function", "main"), self.device, number=1,
                                                repeat=repeat)
                results = timer(*args).results
            return latency_stats([t * 1e3 for t in results], repeat, warmup)
        for _ in range(warmup):
            self(*ins)
        ts = []
        for _ in range(repeat):
            t0 = _time.perf_counter()
            self(*ins)
            ts.append((_time.perf_counter() - t0) * 1e3)
        return latency_stats(ts, repeat, warmup)

    def program(self) -> IntegerProgram:
        """The integer program this library was built from (checked against the manifest)."""
        return program_of(self.library, self.manifest)


def program_of(library: Path, manifest: dict[str, Any]) -> IntegerProgram:
    """The integer program beside `library`, checked against the sha256 in its manifest."""
    from intforge.compiler.manifest import sha256_file

    path = library.parent / manifest["program"]
    if not path.exists():
        raise ArtifactError(f"the integer program {path} named by the manifest is missing")
    if sha256_file(path) != manifest["program_sha256"]:
        raise ArtifactError(f"{path} does not match the sha256 recorded in its manifest")
    return IntegerProgram.load(path)


def read_checked(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The library path and its manifest, after checking both exist and the sha256 matches. A directory
    stands for its model.so, and a manifest (.json) or integer program (.iprog) for the library beside it."""
    from intforge.compiler.manifest import manifest_path_for, read_manifest, sha256_file

    path = Path(path)
    if path.is_dir():
        path = path / "model.so"
    elif path.suffix in (".json", ".iprog"):
        path = path.with_suffix(".so")
    man_path = manifest_path_for(path)
    if not path.exists():
        hint = f" Its manifest {man_path.name} is there; the library was moved or deleted." if man_path.exists() else ""
        raise ArtifactError(f"model library {path} does not exist.{hint} Compile it with `intforge compile`.")
    if not man_path.exists():
        raise ArtifactError(
            f"{path.name} has no manifest: {man_path} is missing. `intforge compile` writes the manifest next "
            "to the library; copy both files together (and the .iprog beside them for `inspect`)."
        )
    try:
        manifest = read_manifest(man_path)
    except ValueError as exc:
        raise ArtifactError(f"manifest {man_path} is not valid JSON ({exc}); recompile the model") from None
    want = manifest.get("library_sha256")
    got = sha256_file(path)
    if want != got:
        raise ArtifactError(
            f"{path} does not match its manifest: sha256 {got[:16]}... but {man_path.name} records "
            f"{str(want)[:16]}.... The library was modified or replaced after compilation; it will not be "
            "loaded. Recompile with `intforge compile`, or restore the original file."
        )
    return path, manifest


def load(path: str | Path, emulate: bool = False):
    """Load model.so after checking it against model.json beside it (existence and sha256).

    A library cross-compiled for another architecture loads only with `emulate=True`: it then runs
    under qemu-user (intforge.emulate.EmulatedModel), with the same input checks."""
    from intforge.compiler.targets import host_arch

    path, manifest = read_checked(path)
    arch = manifest.get("target", {}).get("arch", "x86_64")
    if arch != host_arch():
        if not emulate:
            raise ArtifactError(
                f"{path} was compiled for {arch} (target '{manifest['target'].get('preset')}') and cannot run "
                f"on this {host_arch()} machine. Copy it (with its .json manifest) to the board, time it there "
                f"with `intforge bench {path} --rpc HOST:PORT`, or run it here under emulation with "
                f"`intforge run {path} --emulate`."
            )
        from .emulate import EmulatedModel

        return EmulatedModel(path, manifest)
    return CompiledModel(path, manifest)
