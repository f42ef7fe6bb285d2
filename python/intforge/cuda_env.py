"""CUDA on machines with and without a GPU: nvcc, TVM's CUDA runtime, and the GPU if there is one.

TVM's CUDA runtime library (`libtvm_runtime_cuda.so`) links against the driver's `libcuda.so.1`. On a
machine with `nvcc` but no driver (CI, a build server) TVM silently falls back to a module that can be
compiled but neither exported with its kernels nor loaded. We write our own here: when no driver is
installed, a stub `libcuda.so.1` whose entry points all answer CUDA_ERROR_NO_DEVICE is built once with
the system C compiler and loaded first, so TVM's real CUDA runtime registers, `.so` files embed their
fatbins, and loading one works; running one still needs a GPU and says so.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

from .cache import cache_root
from .errors import IntforgeError

# Every driver symbol libtvm_runtime_cuda.so imports (nm -D --undefined-only), plus cuInit for cudart.
_DRIVER_SYMBOLS = ("cuInit", "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                   "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                   "cuTensorMapEncodeTiled", "cuDriverGetVersion", "cuDeviceGetCount", "cuGetProcAddress",
                   "cuGetProcAddress_v2")
_NO_DEVICE = 100  # CUDA_ERROR_NO_DEVICE


def nvcc_path() -> str | None:
    """The nvcc TVM will compile kernels with, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").exists():
            return str(Path(root, "bin", "nvcc"))
    return None


def nvdisasm_path() -> str | None:
    """nvdisasm (cubin -> SASS): on PATH, in the toolkit, or from the nvidia-cuda-nvdisasm wheel."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    nvcc = nvcc_path()
    if nvcc and Path(nvcc).resolve().with_name("nvdisasm").exists():
        return str(Path(nvcc).resolve().with_name("nvdisasm"))
    try:
        import nvidia

        for root in nvidia.__path__:
            for cand in Path(root).glob("cu*/bin/nvdisasm"):
                return str(cand)
    except ImportError:
        pass
    return None


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _stub_source() -> str:
    body = [f"int {name}() {{ return {_NO_DEVICE}; }}" for name in _DRIVER_SYMBOLS if name != "cuGetErrorString"]
    body.append('int cuGetErrorString(int e, const char** s) { *s = "no CUDA driver (intforge build stub)"; '
                "return 0; }")
    return "/* intforge: stand-in for the CUDA driver on machines without a GPU. */\n" + "\n".join(body) + "\n"


def _build_stub() -> Path:
    src = _stub_source()
    out_dir = cache_root() / "cuda-driver-stub"
    lib = out_dir / "libcuda.so.1"
    c_file = out_dir / "stub.c"
    if lib.exists() and c_file.exists() and c_file.read_text() == src:
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise IntforgeError("building CUDA code on a machine without a GPU needs a C compiler (cc) for the "
                            "driver stub: `apt-get install gcc`")
    out_dir.mkdir(parents=True, exist_ok=True)
    c_file.write_text(src)
    tmp = out_dir / f"libcuda.so.1.{os.getpid()}"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(c_file)], check=True,
                   capture_output=True)
    tmp.replace(lib)
    return lib


@functools.cache
def ensure_runtime() -> bool:
    """Register TVM's CUDA runtime in this process; True when a real driver is present. Raises when the
    CUDA toolkit is missing."""
    import tvm
    from tvm_ffi.libinfo import load_lib_ctypes

    driver = _has_driver()
    if not driver:
        ctypes.CDLL(str(_build_stub()), mode=ctypes.RTLD_GLOBAL)
    if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        runtime_dir = Path(tvm.__file__).parent / "lib"
        try:
            load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
                            mode="RTLD_GLOBAL")
        except (OSError, RuntimeError) as exc:
            raise IntforgeError(f"TVM's CUDA runtime could not be loaded ({exc}). It needs the CUDA 13 runtime "
                                "(libcudart.so.13): install the CUDA toolkit 13.x.") from exc
    return driver


def require_nvcc(target_name: str) -> str:
    """nvcc's path, or an error saying how to get it."""
    path = nvcc_path()
    if path is None:
        raise IntforgeError(f"target '{target_name}' compiles its kernels with nvcc, which is not installed. "
                            "Install the CUDA toolkit 13.x (it provides nvcc; no GPU is needed to compile) and "
                            "put its bin/ on PATH, or set CUDA_HOME.")
    return path


def gpu_available() -> bool:
    """Whether a CUDA GPU can run kernels here."""
    try:
        if not ensure_runtime():
            return False
        import tvm

        return bool(tvm.cuda(0).exist)
    except IntforgeError:
        return False


def local_arch() -> str:
    """'sm_XY' of GPU 0, or an error when there is none."""
    if not gpu_available():
        raise IntforgeError("target 'cuda' means this machine's GPU, and no CUDA GPU was found. Name one "
                            "instead: --target t4 (sm_75), a100 (sm_80) or h100 (sm_90).")
    import tvm

    return "sm_" + str(tvm.cuda(0).compute_version).replace(".", "")
