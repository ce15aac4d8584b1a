"""The worker's queue edge against a real kernel queue: every message it
receives gives its packet a verdict, even one NetfilterQueue cannot read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
QUEUE = 5

# Inside the test's namespace: five datagrams queued at output, then one
# drain by the worker's reader with a receive buffer of BUFFER bytes.
SCRIPT = """
import json, socket, sys
from netfilterqueue import NetfilterQueue
from nftdivert.worker import queue

queue.RECEIVE_BUFFER = int(sys.argv[1])
nfq = NetfilterQueue()
reader = queue._BoundedSocket(nfq.get_fd(), {queue_num})
seen = []

def callback(pkt):
    reader.seen()
    seen.append(len(pkt.get_payload()))
    pkt.accept()

nfq.bind({queue_num}, callback)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(5):
        s.sendto(b"x" * 1000, ("127.0.0.1", 9))  # queued before sendto returns
reader.drain(nfq, 64)
waiting = queue.kernel_queue_drops({{"q": {queue_num}}})["q"]["waiting"]
print(json.dumps({{"seen": seen, "unreadable": reader.unreadable, "waiting": waiting}}))
""".format(queue_num=QUEUE)


def _drain(host, buffer: int) -> dict:
    host.run("ip", "link", "set", "lo", "up")
    host.run("iptables-nft", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "NFQUEUE", "--queue-num", str(QUEUE))
    proc = host.run(sys.executable, "-c", SCRIPT, str(buffer), env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return json.loads(proc.stdout)


def test_whole_messages_reach_the_callback(host):
    assert _drain(host, 8192) == {"seen": [1028] * 5, "unreadable": 0, "waiting": 0}


def test_a_message_cut_off_is_dropped_and_counted_never_left_waiting(host):
    # 200 bytes hold the packet header, never the packet: NetfilterQueue cannot parse it.
    assert _drain(host, 200) == {"seen": [], "unreadable": 5, "waiting": 0}
