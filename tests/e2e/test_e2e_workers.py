"""End to end: several queue workers, each owning the clients its hash gives it.

Sixteen client addresses (twelve IPv4, four IPv6) each fetch a page with
curl and exchange a datagram, towards an address of their own, through a
run with `queue.workers = 2`. Every conversation must be answered and logged
with the destination it asked for, and the listener's `http` record (whose
destination the listener asks of the worker that owns the client) must name
it too: a question sent to the wrong worker finds nothing in its table and
names the listener's own address instead. The exit counters say how many
conversations each worker took, which must be what spread.worker_for
predicts for those addresses: the ruleset's hash and ours agree.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys

import pytest

import harness
from nftdivert.worker import spread

# In the VM tier too: there the workers queue with the native `queue num` statement of their own chains.
pytestmark = [pytest.mark.kernel, pytest.mark.queue_path]

WORKERS = 2
CLIENTS = [f"192.0.2.{20 + i}" for i in range(12)] + [f"2001:db8:1::{0x20 + i:x}" for i in range(4)]


def _target(i: int, client: str) -> str:
    return f"198.51.100.{60 + i}" if ":" not in client else f"2001:db8:2::{0x60 + i:x}"


UDP = r"""
import json, socket, sys
out = []
for client, host in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((client, 0))
    s.settimeout(5)
    s.sendto(b"udp-from-" + client.encode(), (host, 5353 + 1))
    try:
        out.append([client, s.recvfrom(2048)[0].decode()])
    except OSError as exc:
        out.append([client, str(exc)])
print(json.dumps(out))
"""


@pytest.fixture
def many_clients(gw):
    for client in CLIENTS:
        gw.client.run("ip", "addr", "add", *((f"{client}/64", "dev", "eth0", "nodad") if ":" in client
                                             else (f"{client}/24", "dev", "eth0")))
    try:
        yield gw
    finally:
        for client in CLIENTS:
            gw.client.run("ip", "addr", "del", f"{client}/{64 if ':' in client else 24}", "dev", "eth0", check=False)


def test_each_worker_answers_its_clients_and_the_listeners_ask_the_right_one(many_clients):
    gw = many_clients
    gw.stop()
    div = gw.ensure(workers=WORKERS)
    assert f"{WORKERS} queue workers" in div.stderr(), div.stderr()

    for i, client in enumerate(CLIENTS):
        host = _target(i, client)
        url = f"http://[{host}]/w{i}" if ":" in host else f"http://{host}/w{i}"
        got = gw.client.run("curl", "-sS", "--max-time", "10", "--interface", client, "-o", "/dev/null",
                            "-w", "%{http_code}", url, check=False)
        assert got.stdout == "200", (client, got.stdout, got.stderr)
    answers = json.loads(gw.client.run(sys.executable, "-c", UDP,
                                       json.dumps([[c, _target(i, c)] for i, c in enumerate(CLIENTS)])).stdout)
    assert [a for _, a in answers] == [f"udp-from-{c}" for c in CLIENTS], answers

    gw.stop()  # every record written, the final counters printed
    log = div.log()
    for i, client in enumerate(CLIENTS):
        host = _target(i, client)
        shown = f"[{host}]" if ":" in host else host
        starts = {x["protocol"] for x in log if x.get("event") == "start" and x.get("client_address") == client
                  and x["original_destination"] == f"{shown}:{80 if x['protocol'] == 'tcp' else 5354}"}
        assert starts == {"tcp", "udp"}, (client, [x for x in log if x.get("client_address") == client])
        http = [x for x in log if x.get("event") == "http" and x.get("client_address") == client]
        assert [x["original_destination"] for x in http] == [f"{shown}:80"], (client, http)

    owners = [spread.worker_for(ipaddress.ip_address(c).packed, WORKERS) for c in CLIENTS]
    assert set(owners) == set(range(WORKERS)), "these clients should keep every worker busy"
    want = " + ".join(str(2 * owners.count(k)) for k in range(WORKERS))  # a TCP and a UDP conversation each
    took = re.search(r"queue workers' conversations ([\d + ]+)", div.stderr())
    assert took is not None and took[1].strip() == want, (want, div.stderr()[-2000:])
