"""Answers per client: which answer sections a client gets, by its address ([[profiles]]).

Pure: the listeners ask per conversation (the DNS listener per question)
and the ruleset's sets of ports left alone per client come from here, so a
reload that changes a profile changes what new conversations get.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nftdivert.config import Config, CustomRule, DnsConfig, HooksConfig, HttpConfig, Network, PortRange


@dataclass(frozen=True)
class Answers:
    """The answer sections in effect for a client."""

    profile: str | None  # the profile's name; None: the top-level sections
    dns: DnsConfig
    http: HttpConfig
    custom: tuple[CustomRule, ...]
    hooks: HooksConfig
    tcp_ports: tuple[PortRange, ...] = ()  # left alone for these clients, besides [leave_alone]'s
    udp_ports: tuple[PortRange, ...] = ()


def _address(client: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address, or its text ("::ffff:" mapped IPv4 as IPv4); None for what is none."""
    if isinstance(client, str):
        try:
            client = ipaddress.ip_address(client.removeprefix("::ffff:"))
        except ValueError:
            return None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        return client.ipv4_mapped
    return client if isinstance(client, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else None


class Profiles:
    """The answers of each profile, found by a client's address: the longest prefix wins."""

    def __init__(self, config: Config) -> None:
        self.default = Answers(None, config.dns, config.http, config.custom, config.hooks)
        self.answers: dict[str, Answers] = {
            p.name: Answers(p.name, p.dns or config.dns, p.http or config.http,
                            config.custom if p.custom is None else p.custom, p.hooks or config.hooks,
                            p.leave_alone.tcp_ports, p.leave_alone.udp_ports)
            for p in config.profiles}
        # Longest first: the first prefix that holds the address is the longest that does.
        self.prefixes: tuple[tuple[Network, Answers], ...] = tuple(sorted(
            ((net, self.answers[p.name]) for p in config.profiles for net in p.clients),
            key=lambda item: -item[0].prefixlen))

    def __bool__(self) -> bool:
        return bool(self.answers)

    def profile_for(self, client: object) -> Answers:
        """The answer sections for `client` (an address or its text); the top-level ones outside every profile."""
        address = _address(client)
        if address is not None:
            for net, answers in self.prefixes:
                if address.version == net.version and address in net:
                    return answers
        return self.default


def profile_for(config: Config, client: object) -> Answers:
    """The answer sections `config` gives `client` (once; Profiles keeps the lookup for many)."""
    return Profiles(config).profile_for(client)
