"""FTP's pure parts: the PASV reply, and handing a data connection to the session expecting it."""

from __future__ import annotations

import asyncio

from nftdivert.services import ftp


def test_pasv_names_the_address_asked_for_and_the_port_in_two_bytes():
    assert ftp.pasv_reply("203.0.113.9", 50001) == "227 Entering Passive Mode (203,0,113,9,195,81)."


def test_a_data_connection_goes_to_the_session_expecting_its_client_and_port_once():
    async def scenario():
        port, waiting = ftp._expect("192.0.2.2")
        assert ftp.expecting() and ftp.PASSIVE_PORTS[0] <= port <= ftp.PASSIVE_PORTS[1]
        assert ftp.claim("192.0.2.3", port, "other client") is None
        done = ftp.claim("192.0.2.2", port, "stream")
        assert waiting.result() == ("stream", done) and not done.done()
        assert ftp.claim("192.0.2.2", port, "again") is None and not ftp.expecting()

    asyncio.run(scenario())
