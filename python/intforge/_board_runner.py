"""Board-side runner: executed by the board's python (under qemu, or on a real board) with only numpy and
TVM's runtime installed, so it imports nothing from intforge.

usage: _board_runner.py LIBRARY IN.npz OUT.npz
IN.npz holds in0, in1, ... shaped (n, *input_shape); the model runs once per leading index and OUT.npz
gets out0, out1, ... shaped (n, *output_shape).
"""

import sys

import numpy as np
import tvm
import tvm.runtime.vm


def main(library: str, src: str, dst: str) -> None:
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
    with np.load(src) as z:
        ins = [z[f"in{i}"] for i in range(len(z.files))]
    outs: list[list[np.ndarray]] = []
    for k in range(len(ins[0])):
        res = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a[k])) for a in ins])
        res = [res] if isinstance(res, tvm.runtime.Tensor) else list(res)
        outs.append([r.numpy() for r in res])
    np.savez(dst, **{f"out{i}": np.stack([o[i] for o in outs]) for i in range(len(outs[0]))})


if __name__ == "__main__":
    main(*sys.argv[1:4])
