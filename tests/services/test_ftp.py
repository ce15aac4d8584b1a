"""FTP's pure parts: the PASV reply, and handing a data connection to the session expecting it."""

from __future__ import annotations

import asyncio
import ftplib

from fixed import events, listening

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


def test_port_and_eprt_name_the_clients_data_address():
    assert ftp.port_argument("PORT", "192,0,2,7,195,81") == ("192.0.2.7", 50001)
    assert ftp.port_argument("EPRT", "|1|192.0.2.7|50001|") == ("192.0.2.7", 50001)
    assert ftp.port_argument("EPRT", "|2|2001:db8::7|50001|") == ("2001:db8::7", 50001)
    for verb, bad in (("PORT", "1,2,3"), ("PORT", "192,0,2,7,256,1"), ("EPRT", "|3|x|1|"), ("EPRT", "|1|x|0|"),
                      ("EPRT", "")):
        assert ftp.port_argument(verb, bad) is None


def test_retr_serves_a_file_of_the_names_type_and_list_a_tree():
    exe = ftp.file_for("/pub/stage2.exe")
    assert exe[:2] == b"MZ" and ftp.file_for("dir.v2/readme") == b"ok\n"
    assert ftp.listing("NLST") == b"pub\r\nupload\r\nreadme.txt\r\nupdate.exe\r\ndata.zip\r\n"
    assert ftp.listing("LIST").startswith(b"drwxr-xr-x 1 ftp ftp     4096 Jan 01  2024 pub\r\n")
    assert b"type=file;size=1024;modify=20240101000000; update.exe\r\n" in ftp.listing("MLSD")


def test_auth_tls_upgrades_the_control_connection_and_the_login_is_logged_inside(tmp_path):
    with listening(tmp_path, "ftp") as (port, records, ctx):
        f = ftplib.FTP_TLS(timeout=10, context=ctx)
        f.connect("127.0.0.1", port)
        assert "AUTH TLS" in f.sendcmd("FEAT")
        f.login("bot", "pw")  # AUTH TLS first
        assert f.prot_p().startswith("200") and "AUTH TLS" not in f.sendcmd("FEAT")
        f.quit()
    assert events(records, "tls")[0]["starttls"] is True
    assert events(records, "ftp")[0]["password"] == "pw"
