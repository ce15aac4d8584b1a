"""Whether a new conversation to a port is diverted to the default listener.

Kept apart from the per-packet rewrite so that a kernel-rewrite mode, where
the worker only sees a conversation's first packet, makes the same choice.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Divert:
    listener_port: int
    original_port: int


def decide(
    protocol: int,
    daddr: bytes,
    dport: int,
    *,
    listeners: Mapping[int, int],
    is_bound: Callable[[int, bytes, int], bool],
    left_alone: Callable[[int, int], bool],
) -> Divert | None:
    """Divert to the protocol's default listener unless something answers already.

    `daddr` is the destination after NAT: a socket bound to another address
    (127.0.0.1 for a gateway client) or family does not answer there.
    """
    listener = listeners.get(protocol)
    if listener is None or dport == listener:
        return None
    # Cheapest first: is_bound may consult the kernel's socket tables.
    if left_alone(protocol, dport) or is_bound(protocol, daddr, dport):
        return None
    return Divert(listener_port=listener, original_port=dport)
