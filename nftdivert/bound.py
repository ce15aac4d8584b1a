"""Which ports this host's sockets are bound to, read from /proc/net (this namespace's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_TCP_LISTEN = "0A"


@dataclass(frozen=True)
class BoundPorts:
    tcp: frozenset[int]
    udp: frozenset[int]

    def is_bound(self, protocol: str, port: int) -> bool:
        return port in (self.tcp if protocol == "tcp" else self.udp)


def _ports(files: tuple[str, ...], state: str | None, proc: Path) -> frozenset[int]:
    ports = set()
    for name in files:
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        for line in lines:
            cols = line.split()
            if state is not None and cols[3] != state:
                continue
            port = int(cols[1].rsplit(":", 1)[1], 16)
            if port:
                ports.add(port)
    return frozenset(ports)


def read(proc: Path = Path("/proc/net")) -> BoundPorts:
    """Listening TCP ports and bound UDP ports, IPv4 and IPv6 together."""
    return BoundPorts(tcp=_ports(("tcp", "tcp6"), _TCP_LISTEN, proc),
                      udp=_ports(("udp", "udp6"), None, proc))


def set_commands(table: str, ports: BoundPorts) -> str:
    """nft commands that make the table's bound-port sets say `ports`."""
    lines = []
    for proto in ("tcp", "udp"):
        name = f"inet {table} bound_{proto}_ports"
        lines.append(f"flush set {name}")
        values = sorted(getattr(ports, proto))
        if values:
            lines.append(f"add element {name} {{ {', '.join(map(str, values))} }}")
    return "\n".join(lines) + "\n"
