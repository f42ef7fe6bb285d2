"""Where intforge keeps what it measures and builds once: latencies, tuning databases, the arm64 board."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$INTFORGE_CACHE, else ~/.cache/intforge."""
    return Path(os.environ.get("INTFORGE_CACHE", Path.home() / ".cache" / "intforge"))
