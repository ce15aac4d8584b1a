"""The kernel path's backend: nothing is queued, so nothing besides the table."""

from __future__ import annotations

from nftdivert.ruleset.backends.base import QueueBackend
from nftdivert.ruleset.model import NO_BACKEND


class NoQueue(QueueBackend):
    name = NO_BACKEND
    auto_reason = 'divert_path = "kernel": the dstnat rules redirect, nothing is queued'
