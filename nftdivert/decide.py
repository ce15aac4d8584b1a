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
    dport: int,
    *,
    listeners: Mapping[int, int],
    is_bound: Callable[[int, int], bool],
    left_alone: Callable[[int, int], bool],
) -> Divert | None:
    """Divert to the protocol's default listener unless something answers already."""
    listener = listeners.get(protocol)
    if listener is None or dport == listener:
        return None
    # Cheapest first: is_bound may consult the kernel's socket tables.
    if left_alone(protocol, dport) or is_bound(protocol, dport):
        return None
    return Divert(listener_port=listener, original_port=dport)
