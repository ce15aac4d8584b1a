"""The default UDP answer by the original port, with the origin question asked once per tuple."""

from __future__ import annotations

import asyncio
import struct

from nftdivert.config import SmallServicesConfig
from nftdivert.services import clock
from nftdivert.services.default_udp import DefaultUdp
from nftdivert.worker.packet import UDP

CLIENT, LOCAL = ("::ffff:192.0.2.2", 40000, 0, 0), ("192.0.2.1", 1337)


class Origin:
    def __init__(self, port: int | None) -> None:
        self.port, self.asked = port, []

    async def __call__(self, client, local, protocol):
        self.asked.append((client, local, protocol))
        return None if self.port is None else ("198.51.100.9", self.port)


def answer(port: int | None, data: bytes, **small) -> tuple[bytes | None, list[dict], Origin]:
    origin, records = Origin(port), []
    udp = DefaultUdp("udp-echo", records.append, origin, SmallServicesConfig(**small))
    return asyncio.run(udp.answer(data, CLIENT, LOCAL)), records, origin


def test_an_unknown_port_or_origin_is_echoed():
    assert answer(4444, b"hi")[0] == b"hi"
    assert answer(None, b"hi")[0] == b"hi"
    udp = DefaultUdp("udp-echo", None, None)
    assert asyncio.run(udp.answer(b"hi", CLIENT, LOCAL)) == b"hi"  # nobody to ask


def test_ntp_is_answered_with_the_offset_and_logged_with_the_destination():
    request = b"\x23" + b"\0" * 47
    reply, records, origin = answer(123, request, clock_offset=3600)
    got = clock.unix_of_ntp(struct.unpack_from("!Q", reply, 40)[0])
    assert abs(got - clock.now(3600)) < 5
    assert origin.asked == [(CLIENT[:2], LOCAL, UDP)]
    assert records[0]["event"] == "ntp" and records[0]["client"] == "192.0.2.2:40000"
    assert records[0]["original_destination"] == "198.51.100.9:123" and records[0]["listener"] == "udp-echo"


def test_each_port_its_service():
    assert len(answer(37, b"")[0]) == 4
    assert answer(13, b"")[0].endswith(b"-UTC\r\n")
    assert answer(17, b"")[0].endswith(b"\r\n")
    assert len(answer(19, b"")[0]) <= 512
    assert answer(69, b"\x00\x01a.txt\x00octet\x00")[0] == b"\x00\x03\x00\x01ok\n"
    reply, records, _ = answer(514, b"<13>hello")
    assert reply is None and records[0]["event"] == "syslog" and records[0]["message"] == "hello"


def test_the_origin_is_asked_once_per_tuple():
    origin = Origin(69)
    udp = DefaultUdp("udp-echo", None, origin)

    async def transfer() -> list:
        return [await udp.answer(b"\x00\x01a.txt\x00octet\x00", CLIENT, LOCAL),
                await udp.answer(b"\x00\x04\x00\x01", CLIENT, LOCAL)]

    assert asyncio.run(transfer())[1] is None  # the last block acknowledged: done
    assert len(origin.asked) == 1


def test_a_record_names_the_profile_that_answered_its_client(tmp_path):
    from nftdivert.config import load
    from nftdivert.profiles import Profiles
    from nftdivert.services import custom

    path = tmp_path / "c.toml"
    path.write_text('[[profiles]]\nname = "lab"\nclients = ["192.0.2.0/24"]\n')
    records: list[dict] = []
    udp = DefaultUdp("udp-echo", records.append, Origin(37), served=custom.serving(Profiles(load(path))))
    asyncio.run(udp.answer(b"", CLIENT, LOCAL))
    asyncio.run(udp.answer(b"", ("2001:db8:1::2", 40000, 0, 0), ("2001:db8:1::1", 1337)))
    assert [r.get("profile") for r in records] == ["lab", None]
    assert list(records[0])[:3] == ["client", "client_address", "profile"]
