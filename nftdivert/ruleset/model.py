"""What the ruleset says, derived from a Config: the only input of the templates.

The model holds values ready to print (sorted, deterministic), so the
templates stay free of logic beyond `if` and `for`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nftdivert.config import NATIVE_QUEUE, QUEUE_BACKENDS, XT_QUEUE, Config, PortRange
from nftdivert.ruleset import client_sets
from nftdivert.worker import spread

# NetfilterQueue copies at most 4016 bytes of a packet and a rewritten packet
# must go back whole. Clamp the MSS of diverted TCP so that no segment is
# longer: 4016 - 40 (IPv6 header) - 60 (largest TCP header) = 3916. Loopback's
# MTU of 65536 would otherwise allow segments of 64 KiB in local mode.
QUEUE_COPY_LIMIT = 4016
DIVERTED_MSS = QUEUE_COPY_LIMIT - 40 - 60

# The kernel path queues nothing, so it has no queue backend.
NO_BACKEND = "none"
# Fail closed on the kernel path: `run` renews the `serving` set's elements
# every second; this long after the last renewal they are gone.
SERVING_TIMEOUT = 4


@dataclass(frozen=True)
class Ruleset:
    table: str
    backend: str  # "nft": native queue statement; "xt": mark here, queue in iptables-nft; "none": kernel path
    ipv4: bool
    ipv6: bool
    gateway: bool
    local: bool
    interfaces: tuple[str, ...]
    containment: bool
    incoming_queue: int
    outgoing_queue: int
    bypass: bool
    mark: int
    ct_mark: int  # on every conversation the redirect answers: what the conversation log reads
    queued_ct_mark: int  # queue path: on every conversation queued, so all of it stays queued
    default_tcp_port: int | None
    default_udp_port: int | None
    leave_alone_tcp_ports: tuple[str, ...]
    leave_alone_udp_ports: tuple[str, ...]
    leave_alone_hosts_v4: tuple[str, ...]
    leave_alone_hosts_v6: tuple[str, ...]
    leave_alone_users: tuple[str, ...]
    leave_alone_groups: tuple[str, ...]
    leave_alone_cgroups: tuple[tuple[int, str], ...]  # (level, path)
    # A clean stop leaves the containment chain loaded (containment_after_stop = "keep").
    contain_after_stop: bool = False
    mss: int = DIVERTED_MSS
    # The capture (worker.pcap): nflog group of the capture chains, None when nothing is captured.
    capture_group: int | None = None
    # Admission: protocol -> new conversations per second per client address (0: no limit).
    admit: tuple[tuple[str, int], ...] = ()
    admission_group: int = 1338  # nflog group of the dropped conversations' first packets
    # The kernel path: the dstnat rules redirect unbound ports to the default
    # listeners themselves; nothing is queued (see the template).
    kernel_path: bool = False
    serving_timeout: int = SERVING_TIMEOUT
    # [[profiles]]: (set name, address type, `client . port` elements) of the ports left alone per client.
    profile_alone: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    # Queue workers: with more than one, each client address's packets go to the queues of one
    # (worker/spread.py), and on the xt backend its number rides in `worker_mark`'s bits.
    workers: int = 1
    worker_mark: int = 0
    worker_seed: int = spread.SEED

    @property
    def worker_queues(self) -> tuple[tuple[int, int, int, str], ...]:
        """(worker, incoming queue, outgoing queue, xt mark value) of each worker."""
        shift = (self.worker_mark & -self.worker_mark).bit_length() - 1 if self.worker_mark else 0
        return tuple((k, self.incoming_queue + k, self.outgoing_queue + k, f"0x{self.mark | k << shift:x}")
                     for k in range(self.workers))

    @property
    def queue_mark_hex(self) -> str:
        """The bits the xt rules match: the queue mark, and with several workers the worker's number."""
        return f"0x{self.mark | (self.worker_mark if self.workers > 1 else 0):x}"

    @property
    def worker_seed_hex(self) -> str:
        return f"0x{self.worker_seed:x}"

    @property
    def native_queue(self) -> bool:
        return self.backend == NATIVE_QUEUE

    @property
    def xt_queue(self) -> bool:
        return self.backend == XT_QUEUE

    @property
    def admission(self) -> tuple[tuple[str, int, int], ...]:
        """(protocol, rate, burst) of each limited protocol. The burst, half a
        second's worth, lets a scanner's batch through without filling the queue.
        A protocol without a default listener is never queued, so never limited."""
        if self.kernel_path:
            return ()  # admission protects the queue; the kernel path has none
        queued = {"tcp": self.default_tcp_port is not None, "udp": self.default_udp_port is not None}
        return tuple((proto, rate, max(rate // 2, 1)) for proto, rate in self.admit if rate and queued[proto])

    @property
    def default_ports(self) -> tuple[tuple[str, int], ...]:
        """(protocol, port) of each default listener."""
        return tuple((proto, port) for proto, port in (("tcp", self.default_tcp_port), ("udp", self.default_udp_port))
                     if port is not None)

    @property
    def fail_closed(self) -> bool:
        return not self.bypass

    @property
    def mark_hex(self) -> str:
        return f"0x{self.mark:x}"

    @property
    def ct_mark_hex(self) -> str:
        return f"0x{self.ct_mark:x}"

    @property
    def queued_ct_mark_hex(self) -> str:
        return f"0x{self.queued_ct_mark:x}"

    @property
    def unmark_hex(self) -> str:
        return f"0x{~int(self.queue_mark_hex, 16) & 0xFFFFFFFF:x}"

    @property
    def interface_set(self) -> str:
        # Quoted by hand: validation already refused quotes and backslashes,
        # and JSON-style escaping would change the names the kernel matches.
        return ", ".join(f'"{name}"' for name in self.interfaces)

    @property
    def admission_keys(self) -> tuple[tuple[str, str, str, str], ...]:
        """(set suffix, element type, source address expression, header keyword) per enabled family."""
        keys = (("v4", "ipv4_addr", "ip saddr", "ip"), ("v6", "ipv6_addr", "ip6 saddr", "ip6"))
        return tuple(k for k, on in zip(keys, (self.ipv4, self.ipv6)) if on)

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f, on in (("ipv4", self.ipv4), ("ipv6", self.ipv6)) if on)


def _ports(ranges: tuple[PortRange, ...]) -> tuple[str, ...]:
    return tuple(str(r) for r in sorted(set(ranges)))


def _ids(values: tuple[str | int, ...]) -> tuple[str, ...]:
    # Numbers stay numbers; names are quoted and nft resolves them at load time.
    nums = sorted({v for v in values if isinstance(v, int)})
    names = sorted({v for v in values if isinstance(v, str)})
    return tuple(str(n) for n in nums) + tuple(f'"{n}"' for n in names)


def build(config: Config, backend: str) -> Ruleset:
    """The ruleset for `config` with a concrete queue backend ("nft" or "xt");
    the kernel path has none, whatever `backend` says."""
    if backend not in (*QUEUE_BACKENDS, NO_BACKEND):
        raise ValueError(f"backend must be one of {QUEUE_BACKENDS}, not {backend!r}")
    if config.divert_path == "kernel":
        backend = NO_BACKEND
    la = config.leave_alone
    tcp = config.default_listener("tcp")
    udp = config.default_listener("udp")
    hosts = sorted(set(la.hosts), key=lambda n: (n.version, n.network_address, n.prefixlen))
    gateway = config.mode in ("gateway", "both")
    return Ruleset(
        table=config.table,
        backend=backend,
        ipv4=config.ipv4,
        ipv6=config.ipv6,
        gateway=gateway,
        local=config.mode in ("local", "both"),
        interfaces=tuple(sorted(set(config.interfaces))),
        containment=config.forward_containment,
        incoming_queue=config.queue.incoming,
        outgoing_queue=config.queue.outgoing,
        bypass=config.queue.fail == "open",
        mark=config.queue.mark,
        ct_mark=config.worker.ct_mark,
        queued_ct_mark=config.queue.ct_mark,
        default_tcp_port=tcp.port if tcp else None,
        default_udp_port=udp.port if udp else None,
        leave_alone_tcp_ports=_ports(la.tcp_ports),
        leave_alone_udp_ports=_ports(la.udp_ports),
        leave_alone_hosts_v4=tuple(str(n) for n in hosts if n.version == 4),
        leave_alone_hosts_v6=tuple(str(n) for n in hosts if n.version == 6),
        leave_alone_users=_ids(la.users),
        leave_alone_groups=_ids(la.groups),
        leave_alone_cgroups=tuple(
            sorted({(len(p.strip("/").split("/")), p.strip("/")) for p in la.cgroups})
        ),
        contain_after_stop=gateway and config.forward_containment and config.containment_after_stop == "keep",
        capture_group=config.worker.pcap_group if config.worker.pcap else None,
        admit=(("tcp", config.queue.new_tcp_per_source), ("udp", config.queue.new_udp_per_source)),
        admission_group=config.queue.admission_group,
        kernel_path=config.divert_path == "kernel",
        profile_alone=client_sets.sets(config),
        workers=max(config.queue_workers(), 1),
        worker_mark=config.queue.worker_mark,
    )
