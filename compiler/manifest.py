"""model.json: what a deployed model.so takes and returns, how it was built, and its checksum."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

MANIFEST_FORMAT = 1


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_path_for(so_path: str | Path) -> Path:
    """model.so -> model.json (the manifest always sits next to its library)."""
    p = Path(so_path)
    return p.with_suffix(".json")


def versions() -> dict[str, str]:
    import numpy
    import torch
    import tvm

    from intforge import __version__

    return {"intforge": __version__, "tvm": tvm.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def write_manifest(path: str | Path, data: dict[str, Any]) -> Path:
    path = Path(path)
    data = {"format": MANIFEST_FORMAT, **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
