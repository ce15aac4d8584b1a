"""[[profiles]]' ports left alone: the `client . port` sets the ruleset returns on, and the
nft commands that fill them anew on a reload.

A profile's say covers its prefixes less the longer prefixes inside them
(other profiles', or its own), as the listeners choose a profile: the
longest prefix wins. An analysis (task) that chose a profile takes its
clients from every address's profile while it runs: their pairs are the
chosen profile's (the task that wins first, as tasks.TaskTable.owner
chooses). So the elements never overlap, which a set of concatenated
intervals requires.
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


def _less(parts: list[Network], others) -> list[Network]:
    """`parts` less every network of `others` (two prefixes nest or are apart: no partial overlap)."""
    for inner in others:
        kept: list[Network] = []
        for part in parts:
            if part.version != inner.version or not (part.subnet_of(inner) or inner.subnet_of(part)):  # type: ignore[arg-type]
                kept.append(part)
            elif part != inner and inner.subnet_of(part):  # type: ignore[arg-type]
                kept += part.address_exclude(inner)  # type: ignore[arg-type]
        parts = kept  # (a part inside `inner` is gone)
    return parts


def _own_part(net: Network, prefixes: list[Network]) -> list[Network]:
    """`net` less every longer prefix inside it."""
    return _less([net], [inner for inner in prefixes if inner.version == net.version and inner.prefixlen > net.prefixlen])


Chosen = tuple[tuple[Network, "str | None"], ...]  # (a task's clients, the profile it chose), the winner first


def elements(config: Config, chosen: Chosen = ()) -> dict[tuple[str, int], tuple[str, ...]]:
    """(protocol, IP version) -> the `client . ports` elements of that set (pure)."""
    prefixes = [net for p in config.profiles for net in p.clients]
    owned: list[tuple[str, list[Network]]] = []  # (profile, the networks whose pairs are its)
    taken: list[Network] = []  # by tasks that chose a profile
    for i, (net, name) in enumerate(chosen):
        part = _less([net], [earlier for earlier, _ in chosen[:i]])
        if name is not None:  # a task that chose none leaves its clients to their addresses
            owned.append((name, part))
            taken += part
    owned += [(p.name, _less(_own_part(net, prefixes), taken)) for p in config.profiles for net in p.clients]
    by_name = {p.name: p for p in config.profiles}
    found: dict[tuple[str, int], list[str]] = {(proto, v): [] for proto in PROTOCOLS for v in (4, 6)}
    for name, parts in owned:
        profile = by_name.get(name)
        for proto in PROTOCOLS if profile is not None else ():
            ranges = _merged(getattr(profile.leave_alone, f"{proto}_ports"))
            for part in sorted(parts) if ranges else ():  # type: ignore[type-var]
                found[proto, part.version] += [f"{part} . {r}" for r in ranges]
    return {key: tuple(items) for key, items in found.items()}


def sets(config: Config, chosen: Chosen = ()) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(name, address type, elements) of each set, as the template declares them."""
    return tuple((set_name(proto, v), _TYPES[v], items) for (proto, v), items in elements(config, chosen).items())


def set_commands(table: str, config: Config, chosen: Chosen = ()) -> str:
    """nft commands that make the table's sets say what `config`'s profiles leave alone, and
    the profiles the running tasks chose (`chosen`)."""
    lines = []
    for name, _type, items in sets(config, chosen):
        lines.append(f"flush set inet {table} {name}")
        if items:
            lines.append(f"add element inet {table} {name} {{ {', '.join(items)} }}")
    return "".join(line + "\n" for line in lines)
