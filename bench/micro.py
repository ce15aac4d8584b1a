"""The worker's cost per packet, in-process: FixUp.incoming / FixUp.outgoing.

No kernel and no queue: packets made with tests/builders.py go straight
through the pipeline `nftdivert run` builds (worker.build_fixup; the
conversation log watches conntrack, off this path). The gap to the queued packets/s of the live phases
is what NFQUEUE itself costs.
"""

from __future__ import annotations

import statistics
import sys
import time

from common import REPO, BenchError, say
from topology import DIVERT_ADDR, LISTEN_PORT


def micro(iterations: int, reps: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import ipaddress

    import builders
    from nftdivert.config import Config
    from nftdivert.worker.packet import ACK, SYN, TCP, UDP
    from nftdivert.worker.queue import build_fixup

    cfg = Config()
    bound_ports = {LISTEN_PORT, 22}  # the worker's is_bound: a set lookup, as in runner._BoundPorts

    def fresh():
        # As `nftdivert run` wires it: the log watches conntrack, nothing hangs on the worker.
        return build_fixup(cfg, lambda proto, addr, port: port in bound_ports)

    local = ipaddress.ip_address(DIVERT_ADDR).packed  # after `redirect`: the diverter's address
    psh = 0x08
    syn_opts = bytes.fromhex("020405b4" "0402" "080a0000000100000000" "01" "030307")  # MSS SACK TS NOP WS
    ts_opts = bytes.fromhex("0101080a0000000200000001")  # NOP NOP TS

    def client(i: int) -> bytes:
        return ipaddress.ip_address(f"192.0.2.{2 + i // 60000}").packed

    def cport(i: int) -> int:
        return 1024 + i % 60000

    def orig(i: int) -> int:
        return 2000 + (i * 7919) % 60000

    def inc(i, flags, payload=b"", opts=ts_opts):
        return builders.packet(4, TCP, client(i), local, cport(i), orig(i), payload, flags=flags, options=opts)

    def out(i, flags, payload=b"", opts=ts_opts):
        return builders.packet(4, TCP, local, client(i), LISTEN_PORT, cport(i), payload, flags=flags, options=opts)

    n_syn = iterations
    n_conv = 1000
    say(f"micro: building {n_syn + 6 * n_conv} packets")
    syns = [inc(i, SYN, opts=syn_opts) for i in range(n_syn)]
    # One UDP socket scanning ports: every datagram a new conversation from the
    # same client port, so each needs a free alias port at the listener.
    scan = [builders.packet(4, UDP, client(0), local, 5353, 2000 + i, b"probe") for i in range(n_syn)]
    openers = {"in_syn_new": syns, "in_udp_scan_new": scan}
    kinds = {
        "in_syn_new": None,
        "in_udp_scan_new": None,
        "out_synack": [out(i, SYN | ACK, opts=syn_opts) for i in range(n_conv)],
        "in_ack": [inc(i, ACK) for i in range(n_conv)],
        "in_data_64": [inc(i, ACK | psh, bytes(64)) for i in range(n_conv)],
        "in_data_1400": [inc(i, ACK | psh, bytes(1400)) for i in range(n_conv)],
        "out_data_64": [out(i, ACK | psh, bytes(64)) for i in range(n_conv)],
        "out_data_1400": [out(i, ACK | psh, bytes(1400)) for i in range(n_conv)],
    }
    results = {}
    now = time.monotonic()
    for kind, pkts in kinds.items():
        times = []
        for _ in range(reps):
            fx = fresh()
            if pkts is None:  # every packet opens a conversation the table has not seen
                batch, fn = openers[kind], fx.incoming
            else:
                for p in syns[:n_conv]:  # the conversations these packets belong to
                    fx.incoming(p, now)
                batch = pkts * max(1, iterations // n_conv)
                fn = fx.incoming if kind.startswith("in_") else fx.outgoing
            c0 = fx.counters.rewritten
            t0 = time.perf_counter()
            for p in batch:
                fn(p, now)
            dt = time.perf_counter() - t0
            c = fx.counters
            if c.rewritten - c0 != len(batch) or c.errors or c.malformed:
                raise BenchError(f"micro {kind}: {len(batch)} packets, {c.rewritten - c0} rewritten, "
                                 f"{c.errors} errors ({fx.last_error!r}), {c.malformed} malformed")
            times.append(dt / len(batch) * 1e6)
        # Best of the repetitions: other load on the machine only ever adds time.
        us = min(times)
        results[kind] = {"us_per_packet": us, "median_us": statistics.median(times), "packets_per_s": 1e6 / us,
                         "iterations": len(batch), "reps": reps}
        say(f"micro: {kind}: {us:.2f} us/packet")
    # A sanity check of the rewrite itself: the port and a valid checksum.
    fx = fresh()
    new = fx.incoming(syns[0], now)
    if new is None or int.from_bytes(new[22:24], "big") != LISTEN_PORT or not builders.checksum_valid(new):
        raise BenchError("micro: the SYN was not rewritten to the listener with a valid checksum")
    return results
