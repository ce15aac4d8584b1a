"""What `run`'s main loop has on either divert path: the tick, a stop pipe,
and other file descriptors to serve between turns (the listener's origin
questions, the children's sentinels, the log's failure).

The queue path's loop is the Worker (queue.py), which also pumps packets;
the kernel path's is the Ticker: no packet reaches it.
"""

from __future__ import annotations

import os
import select
import time
from typing import Callable


class Pump:
    """Runs until stop(); close() releases it. Subclasses give run()."""

    def __init__(self, tick: Callable[[float], None] | None, tick_seconds: float) -> None:
        self.tick, self.tick_seconds = tick, tick_seconds
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)
        self._readers: dict[int, Callable[[], bool]] = {}

    def add_reader(self, fd: int, callback: Callable[[], bool]) -> None:
        """Also serve `fd` between turns: callback() when readable; False drops it."""
        self._readers[fd] = callback

    def _serve_reader(self, fd: int) -> bool:
        """Call the reader of `fd`; False once it is dropped."""
        if self._readers[fd]():
            return True
        del self._readers[fd]
        return False

    def stop(self) -> None:
        """Ask run() to return; safe from a signal handler or another thread."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:  # full (a stop is pending anyway) or already closed
            pass

    def run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the stop pipe; the loop cannot run again."""
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass


class Ticker(Pump):
    """The kernel path's loop: the tick and the readers, nothing per packet."""

    def run(self) -> None:
        next_tick = time.monotonic() + self.tick_seconds
        while True:
            ready = select.select([self._stop_r, *self._readers], [], [], max(0.0, next_tick - time.monotonic()))[0]
            if self._stop_r in ready:
                return
            for fd in ready:
                self._serve_reader(fd)
            if (now := time.monotonic()) >= next_tick:
                next_tick = now + self.tick_seconds
                if self.tick is not None:
                    self.tick(now)
