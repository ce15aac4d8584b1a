"""The worker's edge that needs no queue bound: the kernel's queue counters."""

from nftdivert import stats
from nftdivert.worker.queue import kernel_queue_drops

# /proc/net/netfilter/nfnetlink_queue: queue, peer portid, waiting, copy mode,
# copy range, dropped (queue full), dropped (socket full), id sequence, 1.
PROC = """\
    0 2899861836  1024 2  4016 26768     3    10079  1
    1 2389831342   779 2  4016     0     0     7797  1
    7        100     0 2  4016     5     5       10  1
"""


def test_the_kernels_counters_of_our_queues_only(tmp_path):
    proc = tmp_path / "nfnetlink_queue"
    proc.write_text(PROC)
    drops = kernel_queue_drops({"incoming": 0, "outgoing": 1, "absent": 9}, proc)
    assert drops == {
        "incoming": {"queue": 0, "waiting": 1024, "queue_full": 26768, "socket_full": 3},
        "outgoing": {"queue": 1, "waiting": 779, "queue_full": 0, "socket_full": 0},
    }
    assert kernel_queue_drops({"incoming": 0}, tmp_path / "missing") == {}


def test_the_summary_ends_with_them():
    snap = {"packets": dict.fromkeys(("seen", "rewritten", "passed", "malformed", "dropped", "errors",
                                      "hook_errors"), 0),
            "conversations": dict.fromkeys(("new", "size", "routes", "client_port_clashes", "kernel_remaps",
                                            "evicted_idle", "evicted_closed", "evicted_cap"), 0),
            "log": dict.fromkeys(("written", "dropped", "failed"), 0),
            "kernel": {"incoming": {"queue": 0, "waiting": 2, "queue_full": 26768, "socket_full": 3}}}
    assert stats.summary(snap).endswith(
        "; kernel: incoming queue 0 dropped 26768 (queue full) + 3 (socket full) + 0 (unreadable), waiting 2")
