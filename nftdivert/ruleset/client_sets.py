"""[[profiles]]' ports left alone: the `client . port` sets the ruleset returns on, and the
nft commands that fill them anew on a reload.

A profile's say covers its prefixes less the longer prefixes inside them
(other profiles', or its own), as the listeners choose a profile: the
longest prefix wins. So the elements never overlap, which a set of
concatenated intervals requires.
"""

from __future__ import annotations

from nftdivert.config import PROTOCOLS, Config, Network, PortRange

_TYPES = {4: "ipv4_addr", 6: "ipv6_addr"}


def set_name(protocol: str, version: int) -> str:
    return f"profile_alone_{protocol}_v{version}"


def _merged(ranges: tuple[PortRange, ...]) -> list[PortRange]:
    """Overlapping and adjacent ranges as one."""
    merged: list[PortRange] = []
    for r in sorted(ranges):
        if merged and r.first <= merged[-1].last + 1:
            merged[-1] = PortRange(merged[-1].first, max(merged[-1].last, r.last))
        else:
            merged.append(r)
    return merged


def _own_part(net: Network, prefixes: list[Network]) -> list[Network]:
    """`net` less every longer prefix inside it."""
    parts = [net]
    for inner in prefixes:
        if inner.version != net.version or inner == net or not inner.subnet_of(net):  # type: ignore[arg-type]
            continue
        parts = [piece for part in parts
                 for piece in (part.address_exclude(inner) if inner.subnet_of(part) and inner != part  # type: ignore[arg-type]
                               else () if part.subnet_of(inner) else (part,))]  # type: ignore[arg-type]
    return sorted(parts)  # type: ignore[type-var]


def elements(config: Config) -> dict[tuple[str, int], tuple[str, ...]]:
    """(protocol, IP version) -> the `client . ports` elements of that set (pure)."""
    prefixes = [net for p in config.profiles for net in p.clients]
    found: dict[tuple[str, int], list[str]] = {(proto, v): [] for proto in PROTOCOLS for v in (4, 6)}
    for profile in config.profiles:
        for proto in PROTOCOLS:
            ranges = _merged(getattr(profile.leave_alone, f"{proto}_ports"))
            for net in profile.clients if ranges else ():
                found[proto, net.version] += [f"{part} . {r}" for part in _own_part(net, prefixes) for r in ranges]
    return {key: tuple(items) for key, items in found.items()}


def sets(config: Config) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(name, address type, elements) of each set, as the template declares them."""
    return tuple((set_name(proto, v), _TYPES[v], items) for (proto, v), items in elements(config).items())


def set_commands(table: str, config: Config) -> str:
    """nft commands that make the table's sets say what `config`'s profiles leave alone."""
    lines = []
    for name, _type, items in sets(config):
        lines.append(f"flush set inet {table} {name}")
        if items:
            lines.append(f"add element inet {table} {name} {{ {', '.join(items)} }}")
    return "".join(line + "\n" for line in lines)
