"""The SSH answer with real clients on loopback: OpenSSH in batch mode, asyncssh offering a password."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import asyncssh
import pytest

from nftdivert.config import Listener, RecognizeConfig, ServerFirstConfig
from nftdivert.services.listeners import Listeners
from test_listeners import free_port

BANNER = "SSH-2.0-OpenSSH_8.4p1 Ubuntu-5ubuntu1.2"


@pytest.fixture
def listening():
    port, records = free_port(socket.SOCK_STREAM), []
    lst = Listeners((Listener("t", "tcp", port),), recognize=RecognizeConfig(wait=0.3), on_event=records.append,
                    server_first=ServerFirstConfig(ssh_banner=BANNER))
    lst.start()
    try:
        yield port, records
    finally:
        lst.stop()


def wait_for(records, event: str) -> list[dict]:
    deadline = time.monotonic() + 10
    while not (found := [r for r in records if r.get("event") == event]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_openssh_in_batch_mode_sees_the_banner_and_exits(listening):
    port, records = listening
    proc = subprocess.run(["ssh", "-v", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o",
                           "UserKnownHostsFile=/dev/null", "-p", str(port), "bob@127.0.0.1", "true"],
                          capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
    assert proc.returncode == 255 and "Permission denied" in proc.stderr
    assert f"Remote protocol version 2.0, remote software version {BANNER[8:]}" in proc.stderr
    (rec,) = wait_for(records, "ssh")
    assert rec["client_version"].startswith("SSH-2.0-OpenSSH") and rec["logins"] == [] and "error" not in rec


def test_a_password_offered_is_logged_and_refused(listening):
    port, records = listening

    async def login() -> None:
        await asyncssh.connect("127.0.0.1", port, username="root", password="toor", known_hosts=None,
                               client_keys=None, preferred_auth="password")

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(asyncio.wait_for(login(), 10))
    (rec,) = wait_for(records, "ssh")
    assert {"user": "root", "password": "toor"} in rec["logins"] and rec["client_version"].startswith("SSH-2.0-")
