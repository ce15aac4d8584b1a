"""Queue backends: how packets reach the worker's queues on this kernel.

`nft` uses the native queue statement (CONFIG_NFT_QUEUE, stock kernels); `xt`
installs two NFQUEUE rules through iptables-nft for kernels without it
(WSL2, OpenWrt, custom builds). `auto` asks the running kernel.
"""

from __future__ import annotations

from nftdivert.config import BACKENDS as CHOICES
from nftdivert.errors import ConfigError, KernelError
from nftdivert.ruleset.kernel import Nft
from nftdivert.ruleset.backends.base import QueueBackend
from nftdivert.ruleset.backends.nft import NativeQueue
from nftdivert.ruleset.backends.none import NoQueue
from nftdivert.ruleset.backends.xt import XtQueue

# In order of preference, like sshuttle's methods: the first this kernel supports wins.
PREFERENCE: tuple[type[QueueBackend], ...] = (NativeQueue, XtQueue)
BACKENDS: dict[str, type[QueueBackend]] = {cls.name: cls for cls in PREFERENCE}


def select(requested: str, nft: Nft, divert_path: str = "queue") -> tuple[QueueBackend, str]:
    """The backend to use and why: (backend, reason). The kernel path queues nothing."""
    if divert_path == "kernel":
        return NoQueue(nft), NoQueue.auto_reason
    if requested in BACKENDS:
        return BACKENDS[requested](nft), "set in the config"
    if requested != "auto":
        raise ConfigError("queue.backend", requested, "must be one of " + ", ".join(CHOICES))
    for cls in PREFERENCE:
        if cls.supported(nft):
            return cls(nft), cls.auto_reason
    raise KernelError("no queue backend works on this kernel: it needs nft_queue, or nft_compat + xt_NFQUEUE")
