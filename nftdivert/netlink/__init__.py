"""The kernel's netlink sockets, in pure Python: the bottom layer (imports nothing of nftdivert's)."""
