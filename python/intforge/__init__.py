"""intforge: integer-only compilation of PyTorch models through TVM."""

__version__ = "0.1.0"

from .api import compile, quantize_model  # noqa: E402
from .errors import IntforgeError  # noqa: E402
from .program import IntegerProgram  # noqa: E402
from .runtime import CompiledModel, load  # noqa: E402

__all__ = ["compile", "quantize_model", "load", "CompiledModel", "IntegerProgram", "IntforgeError",
           "__version__"]
