"""Run and time a model.so on a board through TVM's RPC (a server on the board, or a tracker for a fleet).

The board runs TVM's own server (`python3 -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`, with only
the TVM runtime wheel installed); the library is uploaded, loaded there and timed with TVM's
time_evaluator, so the numbers are the board's, free of network round trips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import IntforgeError
from .runtime import CompiledModel, check_timing, latency_stats, random_inputs


def parse_hostport(text: str, what: str = "--rpc") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise IntforgeError(f"{what} {text!r}: expected HOST:PORT, e.g. 192.168.1.42:9090")
    return host, int(port)


def connect(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
            timeout: int = 60):
    """An RPC session: straight to a server (`rpc`), or one the `tracker` hands out for `key`."""
    from tvm import rpc as tvm_rpc

    try:
        if tracker:
            if not key:
                raise IntforgeError("--tracker needs --key: the device key the boards registered with "
                                    "(e.g. rpi5)")
            host, port = parse_hostport(tracker, "--tracker")
            return tvm_rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=timeout * 10)
        if not rpc:
            raise IntforgeError("give --rpc HOST:PORT (a board's RPC server) or --tracker HOST:PORT --key KEY")
        host, port = parse_hostport(rpc)
        return tvm_rpc.connect(host, port, session_timeout=timeout * 10)
    except IntforgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - connection failures surface as TVM errors of many kinds
        where = tracker or rpc
        raise IntforgeError(
            f"cannot reach the RPC {'tracker' if tracker else 'server'} at {where}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}. Is "
            "`python3 -m tvm.exec.rpc_server` running on the board, and the port open?"
        ) from None


class RemoteModel(CompiledModel):
    """A model.so uploaded to an RPC session and loaded there, callable and timeable from here."""

    def __init__(self, session, library: Path, manifest: dict[str, Any],  # noqa: D107 - loads remotely instead
                 threads: int | None = None) -> None:
        import tvm.runtime.vm

        self.session, self.library, self.manifest = session, Path(library), manifest
        if threads:
            session.get_function("runtime.config_threadpool")(0, threads)
        session.upload(str(self.library))
        self._lib = session.load_module(self.library.name)
        self.dev = session.cpu()
        self._vm = tvm.runtime.vm.VirtualMachine(self._lib, self.dev)

    def _to_device(self, args: tuple[np.ndarray, ...]) -> list:
        import tvm

        return [tvm.runtime.tensor(a, self.dev) for a in self._check(args)]

    def __call__(self, *args: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        res = self._vm["main"](*self._to_device(args))
        if len(self.manifest["outputs"]) == 1:
            return res.numpy()
        return tuple(r.numpy() for r in res)

    def time(self, repeat: int = 50, warmup: int = 5) -> dict[str, float]:
        """Latency statistics in ms, measured on the board by TVM's time_evaluator (one run per sample)."""
        check_timing(repeat, warmup)
        self._vm.set_input("main", *self._to_device(tuple(random_inputs(self.inputs))))
        if warmup:
            self._vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=warmup)("main")
        res = self._vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=repeat)("main")
        return latency_stats(np.asarray(res.results, dtype=np.float64) * 1e3, repeat, warmup)
