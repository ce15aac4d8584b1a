"""nftdivert: answer for any IP address and any port, the nftables way."""

__version__ = "0.1.0"
