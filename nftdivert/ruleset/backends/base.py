"""What every queue backend does besides the nft table itself."""

from __future__ import annotations

from nftdivert.ruleset.kernel import Nft
from nftdivert.ruleset.model import Ruleset


class QueueBackend:
    name = ""
    # Why `auto` picked this backend, for check/apply/run to say.
    auto_reason = ""

    @classmethod
    def supported(cls, nft: Nft) -> bool:
        """Whether this kernel can queue this way (asked by `auto`, in order of preference)."""
        return True

    def __init__(self, nft: Nft) -> None:
        self.nft = nft

    def install(self, rs: Ruleset) -> None:
        """Put in place what the table alone does not (called after the table is loaded)."""

    def remove(self, table: str) -> int:
        """Take away what install() added for `table`; idempotent. Returns how many rules went."""
        return 0

    def installed(self, table: str) -> list[str]:
        """What install() added for `table` that is in the kernel now, one line each."""
        return []

    def expected(self, rs: Ruleset) -> list[str]:
        """What install(rs) adds, in the form installed() reports it."""
        return []
