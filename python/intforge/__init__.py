"""intforge: integer-only compilation of PyTorch models through TVM."""

import os as _os

__version__ = "0.1.0"

# TVM pins each thread-pool worker to a core and leaves the calling thread free. When the scheduler puts
# the caller on a worker's core the two share it until the kernel's load balancer moves one: after each
# library load we measured 15-50 ms at half speed on 2 cores (a layer timed alone came out 2x slow, which
# skewed latency budgets). Unpinned threads never showed it. TVM reads this when its pool starts; a value
# the user set wins.
_os.environ.setdefault("TVM_BIND_THREADS", "0")

from .api import compile, quantize_model  # noqa: E402
from .errors import IntforgeError  # noqa: E402
from .program import IntegerProgram  # noqa: E402
from .runtime import CompiledModel, load  # noqa: E402

__all__ = ["compile", "quantize_model", "load", "CompiledModel", "IntegerProgram", "IntforgeError",
           "__version__"]
