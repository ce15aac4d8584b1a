"""Build IPv4/IPv6 TCP/UDP packets for tests, and check checksums independently.

The independent check uses a different method from nftdivert.worker.checksum: the
one's complement sum of 16-bit words is congruent to the big-endian integer
of the bytes modulo 0xFFFF, because 2**16 == 1 (mod 0xFFFF).
"""
from __future__ import annotations

import ipaddress
import struct

from nftdivert.worker.checksum import internet_checksum, l4_checksum
from nftdivert.worker.packet import SYN, TCP, UDP

V4_CLIENT = ipaddress.ip_address("198.51.100.7").packed
V4_LOCAL = ipaddress.ip_address("203.0.113.1").packed
V6_CLIENT = ipaddress.ip_address("2001:db8::7").packed
V6_LOCAL = ipaddress.ip_address("2001:db8:1::1").packed


def tcp_segment(sport, dport, flags=SYN, payload=b"", *, options=b"", data_offset=None, checksum=0, seq=1000, ack=0):
    if data_offset is None:
        data_offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, data_offset << 4, flags, 65535, checksum, 0)
    return header + options + payload


def udp_datagram(sport, dport, payload=b"", *, length=None, checksum=0):
    if length is None:
        length = 8 + len(payload)
    return struct.pack("!HHHH", sport, dport, length, checksum) + payload


def ipv4(src, dst, protocol, l4, *, total=None, frag=0x4000, options=b"", ihl=None):
    if ihl is None:
        ihl = 5 + len(options) // 4
    if total is None:
        total = 20 + len(options) + len(l4)
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, frag, 64, protocol, 0, src, dst) + options
    )
    struct.pack_into("!H", header, 10, internet_checksum(bytes(header)))
    return bytes(header) + l4


def ipv6(src, dst, next_header, l4, *, payload_length=None):
    if payload_length is None:
        payload_length = len(l4)
    return struct.pack("!IHBB16s16s", 0x60000000, payload_length, next_header, 64, src, dst) + l4


def with_checksum(version, src, dst, protocol, l4):
    """l4 with its checksum field set by the reference full computation."""
    at = 16 if protocol == TCP else 6
    out = bytearray(l4)
    struct.pack_into("!H", out, at, l4_checksum(version, src, dst, protocol, l4))
    return bytes(out)


def extension_headers(chain, protocol):
    """IPv6 extension headers [(type, body), ...] in front of `protocol`:
    (first next-header value, bytes). Each body is 6 bytes plus a multiple of 8."""
    out = b""
    for i, (kind, body) in enumerate(chain):
        assert len(body) % 8 == 6, "a header is a multiple of 8 bytes"
        following = chain[i + 1][0] if i + 1 < len(chain) else protocol
        out += bytes([following, (len(body) + 2) // 8 - 1]) + body
    return (chain[0][0] if chain else protocol), out


PADN6 = b"\x01\x04" + bytes(4)  # one PadN option filling a 6-byte body
HOP_BY_HOP, ROUTING, DEST_OPTS, FRAGMENT_HEADER, AH = 0, 43, 60, 44, 51


def wrap(version, src, dst, protocol, l4, *, ip_options=b"", ext=()):
    if version == 4:
        return ipv4(src, dst, protocol, l4, options=ip_options)
    first, headers = extension_headers(list(ext), protocol)
    return ipv6(src, dst, first, headers + l4)


def packet(version, protocol, src, dst, sport, dport, payload=b"", *, flags=SYN, options=b"",
           ip_options=b"", ext=()):
    """A complete packet with a valid checksum; `ip_options` (IPv4, a multiple
    of 4 bytes) or `ext` (IPv6 extension headers) between IP and TCP/UDP."""
    if protocol == TCP:
        l4 = tcp_segment(sport, dport, flags, payload, options=options)
    else:
        l4 = udp_datagram(sport, dport, payload)
    return wrap(version, src, dst, protocol, with_checksum(version, src, dst, protocol, l4),
                ip_options=ip_options, ext=ext)


def split(data):
    """(version, src, dst, protocol, l4 bytes) of a well-formed test packet."""
    if data[0] >> 4 == 4:
        ihl = (data[0] & 15) * 4
        return 4, data[12:16], data[16:20], data[9], data[ihl:]
    protocol, at = data[6], 40
    while protocol in (HOP_BY_HOP, ROUTING, DEST_OPTS):
        protocol, at = data[at], at + 8 * (data[at + 1] + 1)
    return 6, data[8:24], data[24:40], protocol, data[at:]


def pseudo_header(version, src, dst, protocol, length):
    if version == 4:
        return src + dst + bytes([0, protocol]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + bytes([0, 0, 0, protocol])


def ones_sum(data):
    """One's complement sum in [0, 0xFFFF], 0 only for all-zero input."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    if n == 0:
        return 0
    return n % 0xFFFF or 0xFFFF


def checksum_offset(seg):
    """Where a parsed packet's TCP/UDP checksum field lies."""
    return seg.l4_offset + (16 if seg.protocol == TCP else 6)


def checksum_field(data):
    version, _, _, protocol, l4 = split(data)
    at = 16 if protocol == TCP else 6
    return int.from_bytes(l4[at : at + 2], "big")


def checksum_valid(data):
    """Independent validity check of the L4 checksum of a full packet."""
    version, src, dst, protocol, l4 = split(data)
    field = checksum_field(data)
    if protocol == UDP and field == 0:
        return version == 4  # "no checksum" exists only for IPv4
    return ones_sum(pseudo_header(version, src, dst, protocol, len(l4)) + l4) == 0xFFFF


def differing_offsets(a, b):
    assert len(a) == len(b)
    return {i for i, (x, y) in enumerate(zip(a, b)) if x != y}
