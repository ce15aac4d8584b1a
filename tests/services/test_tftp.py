"""The TFTP state machine: reads by extension, writes kept, options, lost packets."""

from __future__ import annotations

import hashlib
import struct

from nftdivert.services import payloads, tftp

KEY = (("192.0.2.2", 40000), ("198.51.100.69", 1337))


def request(opcode: int, name: str, mode: str = "octet", **options: str) -> bytes:
    parts = [name, mode] + [x for kv in options.items() for x in kv]
    return struct.pack("!H", opcode) + b"".join(p.encode() + b"\0" for p in parts)


def ack(number: int) -> bytes:
    return struct.pack("!HH", tftp.ACK, number)


def data(number: int, body: bytes) -> bytes:
    return struct.pack("!HH", tftp.DATA, number) + body


def opcode(packet: bytes) -> int:
    return struct.unpack_from("!H", packet)[0]


def read_all(server: tftp.Tftp, first: bytes) -> bytes:
    got, packet = b"", first
    while packet is not None:
        assert opcode(packet) == tftp.DATA, packet
        number = struct.unpack_from("!H", packet, 2)[0]
        got += packet[4:]
        packet = server.answer(KEY, ack(number), {})
    return got


def test_a_plain_read_gets_the_payload_of_its_extension_in_512_byte_blocks():
    records = []
    server = tftp.Tftp(records.append)
    first = server.answer(KEY, request(tftp.RRQ, "dir/stage.exe"), {"client": "c"})
    assert len(first) == 4 + 512
    assert read_all(server, first) == payloads.pe()
    assert records == [{"client": "c", "event": "tftp", "operation": "read", "file": "dir/stage.exe",
                        "mode": "octet", "size": len(payloads.pe())}]


def test_a_name_without_a_known_extension_gets_an_elf():
    server = tftp.Tftp(lambda _r: None)
    assert read_all(server, server.answer(KEY, request(tftp.RRQ, "mips"), {}))[:4] == b"\x7fELF"


def test_options_are_acknowledged_then_the_block_size_is_used():
    server = tftp.Tftp(lambda _r: None)
    oack = server.answer(KEY, request(tftp.RRQ, "a.pdf", blksize="1024", tsize="0", timeout="5", bogus="1"), {})
    assert opcode(oack) == tftp.OACK
    pdf = payloads.by_extension("pdf")[1]
    assert oack[2:].split(b"\0")[:-1] == [b"blksize", b"1024", b"tsize", str(len(pdf)).encode(), b"timeout", b"5"]
    first = server.answer(KEY, ack(0), {})
    assert read_all(server, first) == pdf


def test_a_block_size_too_big_for_the_queue_is_lowered():
    server = tftp.Tftp(lambda _r: None)
    oack = server.answer(KEY, request(tftp.RRQ, "a.exe", blksize="65464"), {})
    assert oack[2:].split(b"\0")[:2] == [b"blksize", str(tftp.MAX_BLOCK).encode()]


def test_a_lost_block_is_sent_again_when_the_previous_one_is_acknowledged_again():
    server = tftp.Tftp(lambda _r: None)
    first = server.answer(KEY, request(tftp.RRQ, "a.exe"), {})
    second = server.answer(KEY, ack(1), {})
    assert server.answer(KEY, ack(1), {}) == second  # the client did not get block 2
    assert server.answer(KEY, ack(2), {})[:4] == data(3, b"")[:4]
    assert first[:4] == data(1, b"")[:4]


def test_a_write_is_acknowledged_block_by_block_kept_and_logged(tmp_path):
    records = []
    server = tftp.Tftp(records.append, str(tmp_path))
    body = bytes(range(256)) * 3  # 768 bytes: one full block and one short
    assert server.answer(KEY, request(tftp.WRQ, "loot.bin"), {}) == ack(0)
    assert server.answer(KEY, data(1, body[:512]), {}) == ack(1)
    assert server.answer(KEY, data(1, body[:512]), {}) == ack(1)  # our ACK was lost: acknowledged again
    assert not records
    assert server.answer(KEY, data(2, body[512:]), {}) == ack(2)
    assert server.answer(KEY, data(2, body[512:]), {}) == ack(2)  # the last ACK lost: again, logged once
    digest = hashlib.sha256(body).hexdigest()
    assert records == [{"event": "tftp", "operation": "write", "file": "loot.bin", "mode": "octet", "size": 768,
                        "sha256": digest, "saved": str(tmp_path / digest)}]
    assert (tmp_path / digest).read_bytes() == body


def test_a_write_with_options_starts_with_an_oack():
    server = tftp.Tftp(lambda _r: None)
    assert opcode(server.answer(KEY, request(tftp.WRQ, "x", blksize="8"), {})) == tftp.OACK
    assert server.answer(KEY, data(1, b"12345678"), {}) == ack(1)
    assert server.answer(KEY, data(2, b""), {}) == ack(2)


def test_what_is_out_of_place_gets_an_error():
    server = tftp.Tftp(lambda _r: None)
    assert opcode(server.answer(KEY, ack(1), {})) == tftp.ERROR  # no transfer
    assert opcode(server.answer(KEY, b"\x00\x01", {})) == tftp.ERROR  # too short
    assert opcode(server.answer(KEY, b"\x00\x01name-without-mode", {})) == tftp.ERROR
    assert opcode(server.answer(KEY, b"\x00\x09\x00\x00", {})) == tftp.ERROR  # no such opcode
    server.answer(KEY, request(tftp.RRQ, "a.txt"), {})
    assert opcode(server.answer(KEY, data(1, b"x"), {})) == tftp.ERROR  # DATA to a read
    assert server.answer(KEY, struct.pack("!HH", tftp.ERROR, 0) + b"bye\0", {}) is None
    assert opcode(server.answer(KEY, ack(1), {})) == tftp.ERROR  # the client's error ended it


def test_netascii_goes_on_the_wire_with_cr_lf_and_comes_back_as_it_was(tmp_path):
    text = b"line\nbare\rend\n"
    assert tftp.to_netascii(text) == b"line\r\nbare\r\0end\r\n"
    assert tftp.from_netascii(tftp.to_netascii(text)) == text
    server = tftp.Tftp(lambda _r: None)
    served = read_all(server, server.answer(KEY, request(tftp.RRQ, "a.sh", "netascii"), {}))
    assert tftp.from_netascii(served) == payloads.by_extension("sh")[1] and b"\r\n" in served
    records = []
    server = tftp.Tftp(records.append, str(tmp_path))
    server.answer(KEY, request(tftp.WRQ, "up.txt", "NETASCII"), {})
    server.answer(KEY, data(1, tftp.to_netascii(text)), {})
    assert records[0]["size"] == len(text)
