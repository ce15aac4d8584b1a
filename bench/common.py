"""What every benchmark module shares: the checkout, the error of a failed phase, progress lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
T0 = time.monotonic()


# Ports that answer other than with the echo (a protocol that speaks first or is recognised by
# its port, a small service, TFTP, NTP...): no random target of an echo or a datagram.
NOT_ECHOED = frozenset({9, 13, 17, 19, 21, 22, 25, 37, 53, 69, 79, 110, 113, 123, 143, 465, 514, 587, 990, 993,
                        995, 2525, 6667, 6697})


class BenchError(Exception):
    """A phase failed; the message says why."""


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)
