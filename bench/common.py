"""What every benchmark module shares: the checkout, the error of a failed phase, progress lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T0 = time.monotonic()


class BenchError(Exception):
    """A phase failed; the message says why."""


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)
