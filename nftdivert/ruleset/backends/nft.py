"""Native backend: the table's own `queue` statements; nothing else to manage."""

from __future__ import annotations

from nftdivert.config import NATIVE_QUEUE
from nftdivert.errors import KernelError
from nftdivert.ruleset.kernel import Nft
from nftdivert.ruleset.backends.base import QueueBackend

# A throwaway table, checked and never committed: does this kernel have nft_queue?
_PROBE = """\
add table inet nftdivert_probe
add chain inet nftdivert_probe probe { type filter hook output priority raw; policy accept; }
add rule inet nftdivert_probe probe queue num 0 bypass
"""


class NativeQueue(QueueBackend):
    name = NATIVE_QUEUE
    auto_reason = "auto: the kernel accepts the nft queue statement"

    @classmethod
    def supported(cls, nft: Nft) -> bool:
        try:
            nft.run(_PROBE, dry_run=True, source="queue probe")
        except KernelError as exc:
            if "No such file or directory" in str(exc):
                return False
            raise
        return True
