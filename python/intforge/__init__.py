"""intforge: integer-only compilation of PyTorch models through TVM."""

__version__ = "0.1.0"

# TVM's thread pool reads its settings when it starts, on the first parallel kernel: set intforge's
# defaults (unpinned workers, one per physical core) before anything can start it.
from .threads import configure_thread_pool as _configure_thread_pool  # noqa: E402

_configure_thread_pool()

from .api import compile, quantize_model  # noqa: E402
from .errors import IntforgeError  # noqa: E402
from .onnx_import import load_onnx  # noqa: E402
from .program import IntegerProgram  # noqa: E402
from .runtime import CompiledModel, load  # noqa: E402

__all__ = ["compile", "quantize_model", "load", "load_onnx", "CompiledModel", "IntegerProgram", "IntforgeError",
           "__version__"]
