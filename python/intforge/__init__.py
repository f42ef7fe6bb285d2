"""intforge: integer-only compilation of PyTorch models through TVM."""

import os as _os

__version__ = "0.1.0"

# TVM pins each thread-pool worker to a core and leaves the calling thread free. When the scheduler puts
# the caller on a worker's core the two share it until the kernel's load balancer moves one: after each
# library load we measured 15-50 ms at half speed on 2 cores (a layer timed alone came out 2x slow, which
# skewed latency budgets). Unpinned threads never showed it. TVM reads this when its pool starts; a value
# the user set wins.
_os.environ.setdefault("TVM_BIND_THREADS", "0")

# One pool thread per physical core this process may use, unless the user chose (TVM's own default is
# half the CPUs on x86, one thread on a 2-core VM: see threads.py).
from .threads import set_default_threads as _set_default_threads  # noqa: E402

_set_default_threads()

from .api import compile, quantize_model  # noqa: E402
from .errors import IntforgeError  # noqa: E402
from .program import IntegerProgram  # noqa: E402
from .runtime import CompiledModel, load  # noqa: E402

__all__ = ["compile", "quantize_model", "load", "CompiledModel", "IntegerProgram", "IntforgeError",
           "__version__"]
