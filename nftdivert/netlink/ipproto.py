"""IP protocol numbers, as packets, conntrack tuples and sock_diag carry them."""
from __future__ import annotations

import socket

ICMP = socket.IPPROTO_ICMP  # 1
TCP = socket.IPPROTO_TCP  # 6
UDP = socket.IPPROTO_UDP  # 17
ICMPV6 = socket.IPPROTO_ICMPV6  # 58
