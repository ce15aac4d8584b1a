"""The time services: NTP (UDP 123), Time (RFC 868, port 37) and Daytime (RFC 867, port 13).

A sample checks the clock to find a sandbox (a date years off, a stalled
clock) or to wait for its trigger date; `[small_services] clock_offset`
moves every answer by that many seconds. Pure functions of `now`.
"""

from __future__ import annotations

import struct
import time

NTP_EPOCH = 2208988800  # seconds from 1900-01-01 (NTP's and RFC 868's epoch) to 1970-01-01
_NTP = struct.Struct("!BBbbII4sQQQQ")  # 48 bytes: the header without extension fields or MAC
_CLIENT, _SERVER = 3, 4


def now(offset: float = 0.0) -> float:
    return time.time() + offset


def ntp_timestamp(unix: float) -> int:
    """64-bit NTP timestamp: seconds since 1900 in the high half, the fraction in the low half (era 0 wraps)."""
    return int((unix + NTP_EPOCH) * (1 << 32)) & 0xFFFFFFFFFFFFFFFF


def unix_of_ntp(stamp: int) -> float:
    return stamp / (1 << 32) - NTP_EPOCH


def ntp_answer(request: bytes, unix: float) -> bytes | None:
    """A mode 4 (server) answer to a mode 3 (client) request; None for anything else, as ntpd ignores it.

    Stratum 1 with the reference "GPS": a client that checks the stratum or
    the reference time (a sandbox detector does) sees a synchronised server.
    The client's transmit time comes back as the originate time, which is
    how it matches the answer to its request.
    """
    if len(request) < _NTP.size:
        return None
    first, _, poll = request[0], request[1], request[2]
    version, mode = (first >> 3) & 7, first & 7
    if mode != _CLIENT or not 1 <= version <= 4:
        return None
    transmit = request[40:48]
    stamp = ntp_timestamp(unix)
    return _NTP.pack((0 << 6) | (version << 3) | _SERVER, 1, max(4, min(poll, 17)), -20,
                     0, 0x10,  # root delay 0, root dispersion 1/4096 s (16.16 fixed point)
                     b"GPS\0", ntp_timestamp(unix - 16), struct.unpack("!Q", transmit)[0], stamp, stamp)


def ntp_fields(packet: bytes) -> dict:
    """What the log says about an NTP request: its version and the client's own transmit time."""
    if len(packet) < _NTP.size:
        return {"size": len(packet)}
    return {"version": (packet[0] >> 3) & 7, "mode": packet[0] & 7,
            "client_time": round(unix_of_ntp(struct.unpack_from("!Q", packet, 40)[0]), 3)}


def time_answer(unix: float) -> bytes:
    """RFC 868: seconds since 1900 as 32 bits, big-endian (wraps in 2036, as the protocol does)."""
    return struct.pack("!I", int(unix + NTP_EPOCH) & 0xFFFFFFFF)


def daytime_answer(unix: float) -> bytes:
    """RFC 867 leaves the form open; this is the one most daytime servers send."""
    return time.strftime("%A, %B %d, %Y %H:%M:%S-UTC", time.gmtime(unix)).encode() + b"\r\n"
