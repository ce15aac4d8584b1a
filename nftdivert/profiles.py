"""Answers per client: which answer sections a client gets, by its address ([[profiles]]),
or by the analysis (task) it belongs to, if that task chose a profile.

Pure: the listeners ask per conversation (the DNS listener per question)
and the ruleset's sets of ports left alone per client come from here, so a
reload that changes a profile changes what new conversations get. A task's
choice wins over the address while the task runs: `chosen` is the table of
tasks, which the run replaces whenever a task starts or ends.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from nftdivert.tasks import TaskTable
from nftdivert.config import Config, CustomRule, DnsConfig, HooksConfig, HttpConfig, PortRange


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


def _leading(address: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int) -> int:
    """The address's first `length` bits."""
    return int(address) >> (address.max_prefixlen - length)


class Profiles:
    """The answers of each profile, found by the task a client belongs to if it chose one, else by
    the client's address: the longest prefix wins."""

    chosen: TaskTable = TaskTable()  # the tasks; replaced (never changed) as they start and end

    def __init__(self, config: Config) -> None:
        self.default = Answers(None, config.dns, config.http, config.custom, config.hooks)
        self.answers: dict[str, Answers] = {
            p.name: Answers(p.name, p.dns or config.dns, p.http or config.http,
                            config.custom if p.custom is None else p.custom, p.hooks or config.hooks,
                            p.leave_alone.tcp_ports, p.leave_alone.udp_ports)
            for p in config.profiles}
        # Per family and prefix length, longest first: the network's leading bits -> its answers. A
        # lookup costs a dict lookup per length in use, however many prefixes (a lab's VMs) there are.
        by_length: dict[tuple[int, int], dict[int, Answers]] = {}
        for p in config.profiles:
            for net in p.clients:
                by_length.setdefault((net.version, net.prefixlen), {})[_leading(net.network_address, net.prefixlen)] \
                    = self.answers[p.name]
        self.lengths = tuple(sorted(by_length.items(), key=lambda item: -item[0][1]))
        # Where the addresses that stand for names lie: the pools, every profile's fixed answers too.
        self.named = tuple(dict.fromkeys(net for answers in (self.default, *self.answers.values())
                                         for net in answers.dns.named()))

    def __bool__(self) -> bool:
        return bool(self.answers)

    def profile_for(self, client: object, when: float | None = None) -> Answers:
        """The answer sections for `client` (an address or its text) at `when` (wall clock; None: now);
        the top-level ones outside every profile."""
        chosen = self.chosen
        if not self.lengths and not chosen.intervals:  # nothing to parse (the observer asks for every record)
            return self.default
        address = _address(client)
        if address is not None and chosen.intervals:
            found = self.answers.get(chosen.profile_of(address, time.time() if when is None else when))
            if found is not None:  # (a reload cannot take a running task's profile away)
                return found
        if address is not None:
            for (version, length), nets in self.lengths:
                if version == address.version:
                    found = nets.get(_leading(address, length))
                    if found is not None:
                        return found
        return self.default


def profile_for(config: Config, client: object) -> Answers:
    """The answer sections `config` gives `client` (once; Profiles keeps the lookup for many)."""
    return Profiles(config).profile_for(client)
