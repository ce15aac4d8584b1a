"""Queue backends: how packets reach the worker's queues on this kernel.

`nft` uses the native queue statement (CONFIG_NFT_QUEUE, stock kernels); `xt`
installs two NFQUEUE rules through iptables-nft for kernels without it
(WSL2, OpenWrt, custom builds). `auto` asks the running kernel.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..kernel import Nft
from .base import QueueBackend
from .nft import NativeQueue
from .xt import XtQueue

BACKENDS: dict[str, type[QueueBackend]] = {"nft": NativeQueue, "xt": XtQueue}


def select(requested: str, nft: Nft) -> tuple[QueueBackend, str]:
    """The backend to use and why: (backend, reason)."""
    if requested in BACKENDS:
        return BACKENDS[requested](nft), "set in the config"
    if requested != "auto":
        raise ConfigError("queue.backend", requested, "must be one of auto, nft, xt")
    if NativeQueue.kernel_supports(nft):
        return NativeQueue(nft), "auto: the kernel accepts the nft queue statement"
    return XtQueue(nft), "auto: the kernel has no nft queue statement (CONFIG_NFT_QUEUE), using iptables-nft NFQUEUE"
