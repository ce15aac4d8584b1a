"""NTP, Time and Daytime answers (pure functions of the time)."""

from __future__ import annotations

import struct

from nftdivert.services import clock

NOW = 1796530673.25  # 2026-12-06 04:17:53.25 UTC


def request(version: int = 4, mode: int = 3, transmit: int = 0x1122334455667788) -> bytes:
    return bytes([(version << 3) | mode]) + b"\0" * 39 + struct.pack("!Q", transmit)


def test_a_client_request_gets_a_server_answer_with_the_time_and_its_own_transmit_time_back():
    reply = clock.ntp_answer(request(), NOW)
    assert len(reply) == 48
    assert reply[0] & 7 == 4 and (reply[0] >> 3) & 7 == 4 and reply[0] >> 6 == 0  # server, v4, no leap warning
    assert reply[1] == 1 and reply[12:16] == b"GPS\0"  # stratum 1: synchronised
    assert reply[24:32] == struct.pack("!Q", 0x1122334455667788)  # originate = the client's transmit
    for at in (32, 40):  # receive and transmit
        assert abs(clock.unix_of_ntp(struct.unpack_from("!Q", reply, at)[0]) - NOW) < 1e-6
    assert clock.unix_of_ntp(struct.unpack_from("!Q", reply, 16)[0]) < NOW  # the reference time is before


def test_the_clients_version_is_answered_in_kind():
    assert (clock.ntp_answer(request(version=3), NOW)[0] >> 3) & 7 == 3


def test_what_is_no_client_request_gets_no_answer():
    assert clock.ntp_answer(request(mode=4), NOW) is None  # a server's packet
    assert clock.ntp_answer(request(mode=6), NOW) is None  # control (ntpq)
    assert clock.ntp_answer(b"\x23" * 47, NOW) is None
    assert clock.ntp_answer(request(version=0), NOW) is None


def test_the_request_is_described_for_the_log():
    assert clock.ntp_fields(request(transmit=clock.ntp_timestamp(NOW))) == {"version": 4, "mode": 3,
                                                                          "client_time": round(NOW, 3)}
    assert clock.ntp_fields(b"x") == {"size": 1}


def test_time_is_seconds_since_1900_in_32_bits():
    assert struct.unpack("!I", clock.time_answer(NOW))[0] == int(NOW) + 2208988800
    assert clock.time_answer(0) == struct.pack("!I", 2208988800)


def test_daytime_is_a_line_of_the_date():
    assert clock.daytime_answer(NOW) == b"Sunday, December 06, 2026 04:17:53-UTC\r\n"


def test_the_offset_moves_now():
    assert clock.now(86400) - clock.now() > 86399
