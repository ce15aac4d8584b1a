"""End to end: a listener's record names the client as its conversation's start does.

A client port used first towards one address, then towards another: the
first conversation's entry (TIME_WAIT, the listener closed first) still
holds the reply tuple, so the kernel gives the second one another client
port at input NAT; on the queue path, towards another port, the worker
gives it an alias instead (the listener's socket lingers on the binding).
Either way the listener sees a port the client never used. Its records
must still name the client's own port, the one in the start record, and
say what it saw in `listener_client_port`. Backend: NFTDIVERT_TEST_BACKEND,
as in test_e2e.py.
"""

from __future__ import annotations

import json
import sys
import uuid

import pytest

import harness

pytestmark = pytest.mark.kernel


@pytest.mark.any_backend  # the worker's table and the log's order, the same on both backends
@pytest.mark.parametrize("second_port", [80, 81], ids=["same-port-kernel-remap", "other-port"])
def test_a_listeners_record_names_the_client_port_the_client_used(gw, second_port):
    gw.stop()
    div = gw.ensure()
    tag = uuid.uuid4().hex[:6]
    sports = [gw.fresh_port() for _ in range(6)]

    def request(k: int, batch: str) -> str:
        return f"GET /{tag}/{batch}/{k} HTTP/1.1\r\nHost: client-port.example\r\n\r\n"

    first = [[p, "198.51.100.40", 80, request(k, "first")] for k, p in enumerate(sports)]
    second = [[p, "198.51.100.41", second_port, request(k, "second")] for k, p in enumerate(sports)]
    for batch in (first, second):
        r = gw.client_run("from-ports", "--json", json.dumps(batch), timeout=60)
        assert all(x["ok"] and x["reply"].startswith("HTTP/1.1 200") for x in r["results"]), r["results"]

    gw.stop()  # every record written
    log = div.log()
    starts = {(x["client"], x["original_destination"]): i for i, x in enumerate(log) if x.get("event") == "start"}
    kernels = {(x["client"], x["original_destination"]): x["listener_client_port"]
               for x in log if x.get("event") == "start" and "listener_client_port" in x}
    mine = [(i, x) for i, x in enumerate(log) if x.get("event") == "http" and f"/{tag}/" in x.get("url", "")]
    assert len(mine) == 12, mine
    for i, x in mine:
        batch, k = x["url"].split("/")[-2:]
        want = f"{harness.CLIENT4}:{sports[int(k)]}"
        assert x["client"] == want, f"the {batch} batch's record names {x['client']}, its client used {want}: {x}"
        at = starts.get((x["client"], x["original_destination"]))
        assert at is not None and at < i, f"no start before the record of {x['client']}: {x}"
        assert x["community_id"] == log[at]["community_id"], (x, log[at])  # the flow the client made
        if batch == "first":
            assert "listener_client_port" not in x, x
        else:  # the listener saw another port: the kernel's (its start says which) or the worker's
            assert x.get("listener_client_port") not in (None, sports[int(k)]), x
            key = (x["client"], x["original_destination"])
            assert key not in kernels or kernels[key] == x["listener_client_port"], (x, kernels.get(key))


_UDP_FROM_ONE_PORT = """
import json, socket, sys
sport, targets = int(sys.argv[1]), json.loads(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", sport))
sock.settimeout(5)
out = []
for host, port in targets:
    sock.sendto(b"what time is it", (host, port))
    data, source = sock.recvfrom(65536)
    out.append([len(data), list(source)])
print(json.dumps(out))
"""


@pytest.mark.any_backend
@pytest.mark.parametrize("second_port", [37, 13], ids=["same-port-kernel-remap", "other-port"])
def test_a_udp_listeners_record_names_the_client_port_the_client_used(gw, second_port):
    """One UDP socket asks one address for the time, then another: the first
    conversation is still tracked, so the second gets another client port at
    the listener (the kernel's, or on the queue path towards another port the
    worker's alias). The UDP listener asks its parent, on both paths."""
    div = gw.ensure()
    sport = gw.fresh_port()
    targets = [["198.51.100.42", 37], [f"198.51.100.{second_port}", second_port]]
    asked = [f"{host}:{port}" for host, port in targets]
    got = json.loads(gw.client.run(sys.executable, "-c", _UDP_FROM_ONE_PORT, str(sport), json.dumps(targets)).stdout)
    assert [source for _size, source in got] == targets, got
    lines = gw.log_barrier(div)
    client = f"{harness.CLIENT4}:{sport}"
    starts = [x for x in lines if x["event"] == "start" and x["client"] == client]
    assert sorted(x["original_destination"] for x in starts) == sorted(asked), starts
    records = [x for x in lines if x["event"] in ("time", "daytime") and x["original_destination"] in asked
               and x["time"] >= min(s["time"] for s in starts)]
    assert [x["client"] for x in records] == [client, client], records
    first, second = records
    assert "listener_client_port" not in first and second.get("listener_client_port") not in (None, sport), records
