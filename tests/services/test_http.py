"""The HTTP answer: rules, files by extension, whole requests read on a real socket."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import struct
import subprocess
import zipfile
import zlib

import pytest

from conftest import nftdivert_argv
from nftdivert.config import HttpConfig, HttpRule, Listener, PortRange, RecognizeConfig, from_mapping
from nftdivert.errors import ConfigError
from nftdivert.services import http, payloads
from nftdivert.services.listeners import Listeners


def test_rules_match_host_and_path_in_order_and_fall_back_to_the_extension(tmp_path):
    stage = tmp_path / "stage.bin"
    stage.write_bytes(b"\x01real")
    cfg = HttpConfig(rules=(
        HttpRule(host="*.c2.example", path="/gate.php", status=404, headers=(("X-Id", "7"),), body="no"),
        HttpRule(host="*", path="/files/*", file=str(stage), headers=(("Content-Type", "application/x-bin"),)),
    ))
    assert http.answer(cfg, "A.C2.example", "/gate.php?id=1") == (404, [("X-Id", "7"), ("Content-Type", "text/html")],
                                                                   b"no")
    assert http.answer(cfg, "other.example", "/files/x.exe") == (200, [("Content-Type", "application/x-bin")],
                                                                  b"\x01real")
    status, headers, body = http.answer(cfg, "c2.example", "/gate.php")  # no match: the host differs
    assert status == 200 and body == cfg.body.encode()
    assert http.answer(cfg, "x", "/a/b.PNG")[1] == [("Content-Type", "image/png")]
    assert http.answer(cfg, "x", "/update.json?v=2")[2] == b"{}\n"


def test_pe_files_parse_as_exe_and_dll():
    for dll in (False, True):
        data = payloads.pe(dll)
        at = struct.unpack_from("<I", data, 0x3C)[0]
        assert data[:2] == b"MZ" and data[at:at + 4] == b"PE\0\0"
        machine, sections, _, _, _, opt_size, flags = struct.unpack_from("<HHIIIHH", data, at + 4)
        assert machine == 0x14C and sections == 1 and opt_size == 0xE0
        assert bool(flags & 0x2000) is dll and flags & 0x0002  # IMAGE_FILE_DLL, EXECUTABLE_IMAGE
        opt = at + 24
        magic, entry, image_size, headers_size = (struct.unpack_from("<H", data, opt)[0],
                                                  struct.unpack_from("<I", data, opt + 16)[0],
                                                  struct.unpack_from("<I", data, opt + 56)[0],
                                                  struct.unpack_from("<I", data, opt + 60)[0])
        assert magic == 0x10B and entry == 0x1000 and image_size == 0x2000 and headers_size == 0x200
        section = opt + 0xE0
        _, vsize, vaddr, raw_size, raw_at = struct.unpack_from("<8sIIII", data, section)
        assert vaddr == entry and raw_at + raw_size == len(data) and vsize <= raw_size


def test_png_and_zip_are_valid():
    png = payloads.by_extension("png")[1]
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(png):
        size = struct.unpack_from("!I", png, pos)[0]
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + size]
        assert struct.unpack_from("!I", png, pos + 8 + size)[0] == zlib.crc32(kind + data)
        kinds.append(kind)
        pos += 12 + size
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    with zipfile.ZipFile(io.BytesIO(payloads.by_extension("zip")[1])) as z:
        assert z.testzip() is None and z.namelist() == ["readme.txt"]
    assert payloads.by_extension("html") is None  # the configured page


@pytest.fixture
def served(tmp_path):
    """A listener on a free loopback port; the records it logs."""
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        port = s.getsockname()[1]
    records: list[dict] = []
    cfg = HttpConfig(bodies_dir=str(tmp_path / "bodies"), max_body=1000)
    lst = Listeners((Listener("t", "tcp", port),), http=cfg, recognize=RecognizeConfig(wait=0.5),
                    on_event=records.append)
    lst.start()
    try:
        yield port, records, tmp_path / "bodies"
    finally:
        lst.stop()


def exchange(port: int, *parts: bytes, read_between: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        got = b""
        for part in parts:
            s.sendall(part)
            if read_between:
                got += s.recv(4096)
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_a_chunked_body_is_read_whole_and_hashed(served):
    port, records, _ = served
    reply = exchange(port, b"POST /c HTTP/1.1\r\nHost: h.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert records[-1]["body_size"] == 11 and records[-1]["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert records[-1]["url"] == "http://h.example/c"


def test_expect_100_continue_gets_its_100_before_the_body(served):
    port, records, _ = served
    reply = exchange(port, b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n", b"abc",
                     read_between=True)
    assert reply.startswith(b"HTTP/1.1 100 ") and b"HTTP/1.1 200 " in reply
    assert records[-1]["body_size"] == 3


def test_a_body_above_the_cap_is_hashed_whole_and_saved_in_part(served):
    port, records, bodies = served
    body = bytes(range(256)) * 10
    exchange(port, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    rec = records[-1]
    digest = hashlib.sha256(body).hexdigest()
    assert rec["body_sha256"] == digest and rec["body_size"] == len(body) and rec["body_saved_bytes"] == 1000
    assert (bodies / f"{digest}.part").read_bytes() == body[:1000]
    assert [p.name for p in bodies.iterdir()] == [f"{digest}.part"]  # no temporary file left


def test_a_malformed_request_gets_400_and_is_logged(served):
    port, records, _ = served
    reply = exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert records[-1]["event"] == "http" and "error" in records[-1]


def test_a_client_that_closes_mid_body_leaves_no_file(served):
    port, records, bodies = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nonly-this")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert "closed" in records[-1]["error"]
    assert not bodies.exists() or not list(bodies.iterdir())


@pytest.mark.parametrize("rule, key, reason", [
    ({"status": 99}, "http.rules[0].status", "200-599"),
    ({"status": "200"}, "http.rules[0].status", "not str"),
    ({"headers": {"X-A": "1\r\nX-B: 2"}}, "http.rules[0].headers.X-A", "no line breaks"),
    ({"headers": {"Bad Name": "1"}}, "http.rules[0].headers", "token"),
    ({"headers": {"Content-Length": "5"}}, "http.rules[0].headers", "leave it out"),
    ({"headers": ["x"]}, "http.rules[0].headers", "a table"),
    ({"file": "/nonexistent/stage.exe"}, "http.rules[0].file", "No such file"),
    ({"file": "/dev/zero"}, "http.rules[0].file", "regular file"),
    ({"file": "/etc/hostname", "body": "x"}, "http.rules[0].file", "not both"),
    ({"host": ""}, "http.rules[0].host", "1-1024"),
    ({"hots": "x"}, "http.rules[0].hots", "unknown key"),
])
def test_bad_rules_name_the_key(rule, key, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping({"http": {"rules": [rule]}})
    assert info.value.key == key and reason in str(info.value)


@pytest.mark.parametrize("section, key, reason", [
    ({"http": {"max_body": -1}}, "http.max_body", "0-1073741824"),
    ({"http": {"bodies_dir": "a\nb"}}, "http.bodies_dir", "newline"),
    ({"tls": {"state_dir": ""}}, "tls.state_dir", "needs a directory"),
    ({"tls": {"max_certs": 0}}, "tls.max_certs", "1-65536"),
    ({"tls": {"keylog": 5}}, "tls.keylog", "not int"),
    ({"recognize": {"wait": 0}}, "recognize.wait", "more than 0"),
    ({"recognize": {"wait": True}}, "recognize.wait", "boolean"),
    ({"server_first": {"hostname": "a b"}}, "server_first.hostname", "letters, digits"),
    ({"server_first": {"mail_dir": "a\0b"}}, "server_first.mail_dir", "NUL"),
    ({"server_first": {"uploads_dir": 1}}, "server_first.uploads_dir", "not int"),
    ({"server_first": {"ssh_banner": "SSH-1.5-old"}}, "server_first.ssh_banner", "SSH-2.0-"),
    ({"server_first": {"ssh_banner": "SSH-2.0-x\r\nInjected"}}, "server_first.ssh_banner", "printable"),
    ({"server_first": {"banner": "x"}}, "server_first.banner", "unknown key"),
])
def test_bad_answer_settings_name_the_key(section, key, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping(section)
    assert info.value.key == key and reason in str(info.value)


def test_a_bad_rule_is_one_line_and_exit_status_2(tmp_path, cli_env):
    config = tmp_path / "c.toml"
    config.write_text('[[http.rules]]\nhost = "*"\nstatus = 700\n')
    proc = subprocess.run(nftdivert_argv("render", "-c", str(config)), capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "nftdivert: bad config: http.rules[0].status = 700: a final status is 200-599\n"


def test_a_rule_from_toml_answers(tmp_path):
    cfg = from_mapping({"http": {"rules": [{"path": "/api/*", "status": 201, "body": '{"ok": true}',
                                            "headers": {"Content-Type": "application/json"}}]}})
    status, headers, body = http.answer(cfg.http, "x", "/api/v1")
    assert status == 201 and json.loads(body) == {"ok": True} and headers == [("Content-Type", "application/json")]


def test_a_body_that_cannot_be_saved_is_still_answered_and_logged(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    body = http.Body(str(blocker / "bodies"), 100)  # a directory under a file: cannot exist
    body.add(b"abc")
    info = body.finish()
    assert info["body_size"] == 3 and "body_saved" not in info and "Not a directory" in info["body_save_error"]


def test_a_header_beyond_64_kib_gets_400_not_memory(served):
    port, records, _ = served
    reply = exchange(port, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and "error" in records[-1]


# ---- rules by port, method and query; delay, redirect, close, script ------------


def test_rules_match_the_port_asked_for_the_method_and_query_parameters():
    cfg = HttpConfig(rules=(
        HttpRule(method="POST", path="/gate", body="posted"),
        HttpRule(query=(("id", "7"), ("k", "*")), body="seven"),
        HttpRule(ports=(PortRange(8080, 8081),), body="alt port"),
    ))
    assert http.answer(cfg, "x", "/gate", "post")[2] == b"posted"
    assert http.answer(cfg, "x", "/gate", "GET")[2] == cfg.body.encode()
    assert http.answer(cfg, "x", "/q?k=&id=7")[2] == b"seven"
    assert http.answer(cfg, "x", "/q?id=7")[2] == cfg.body.encode()  # k is missing
    assert http.answer(cfg, "x", "/", port=8081)[2] == b"alt port"
    assert http.answer(cfg, "x", "/", port=80)[2] == cfg.body.encode()


def test_redirect_close_and_a_script(tmp_path):
    script = tmp_path / "panel.py"
    script.write_text("def http(request):\n"
                      "    if request.query.get('bot') == 'boom':\n"
                      "        raise LookupError('no such bot')\n"
                      "    return 201, {'X-Bot': request.query['bot']}, request.method + ' ' + request.original\n")
    cfg = HttpConfig(rules=(HttpRule(host="old.example", redirect="https://new.example/"),
                            HttpRule(host="drop.example", close=True),
                            HttpRule(host="panel.example", script=str(script), delay=0.5)))
    assert http.answer(cfg, "old.example", "/") == (302, [("Location", "https://new.example/")], b"")
    assert http.answer(cfg, "drop.example", "/")[0] == 0
    base = {"client": "192.0.2.2:4000", "original_destination": "198.51.100.9:80"}
    got = http.respond(cfg, http.Transports(), base, "GET", "panel.example", "/g?bot=7", [], http.Body("", 0))
    assert got == (201, [("X-Bot", "7"), ("Content-Type", "text/html")], b"GET 198.51.100.9:80", {"delay": 0.5})
    failed = http.respond(cfg, http.Transports(), base, "GET", "panel.example", "/g?bot=boom", [], http.Body("", 0))
    assert failed == (0, [], b"", {"error": "LookupError: no such bot"})


@pytest.mark.parametrize("rule, key, reason", [
    ({"method": "PO ST"}, "http.rules[0].method", "a method"),
    ({"delay": -1}, "http.rules[0].delay", "0-3600"),
    ({"redirect": "ftp://x"}, "http.rules[0].redirect", "http://"),
    ({"close": 1}, "http.rules[0].close", "true or false"),
    ({"close": True, "body": "x"}, "http.rules[0].close", "not both"),
    ({"ports": [0]}, "http.rules[0].ports[0]", "1-65535"),
    ({"query": {"id": 7}}, "http.rules[0].query.id", "pattern"),
    ({"script": "/nonexistent.py"}, "http.rules[0].script", "No such file"),
])
def test_bad_new_rule_keys_name_the_key(rule, key, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping({"http": {"rules": [rule]}})
    assert info.value.key == key and reason in info.value.reason, info.value
