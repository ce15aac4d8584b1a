"""The sides measured, each in the diverter namespace, each on TCP 1337.

  nftdivert        `nftdivert run` (queue backend auto), conversation log as JSON and pcap (-w); --observe
  nftdivert-quiet  the same with neither: what observing costs is the difference
  kernel-only      one nat rule `redirect to :1337`, no queue, no worker

Both answer with the same echo listener code (nftdivert.services.listeners.Listeners).
A side has start(), counters() (the worker's packet counters, or None) and
stop(), which checks that it left nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, BenchError
from topology import Topology

from nftdivert.lab import netns

REF_TABLE = """\
table inet ref {
	chain p {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type != local meta l4proto tcp redirect to :1337
	}
}
"""

# The kernel-only side's listener: the very Listeners nftdivert runs, alone.
ECHO_SERVER = """\
import json, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
from dataclasses import asdict
from nftdivert.config import DEFAULT_LISTENERS
from nftdivert.services.listeners import Listeners
listeners = Listeners(DEFAULT_LISTENERS, ipv6=True)
listeners.start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
listeners.stop()
print(json.dumps({k: asdict(v) for k, v in listeners.stats.items()}), flush=True)
"""


def nftdivert_argv() -> list[str]:
    cli = Path(sys.executable).parent / "nftdivert"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "nftdivert"]


class NftdivertSide:
    """`nftdivert run`, observed (`observe`: the conversation log, the pcap, or both on) or quiet (neither)."""

    def __init__(self, topo: Topology, tmp: Path, rnd: int, observe: tuple[str, ...] = ("log", "pcap")) -> None:
        self.topo, self.tmp, self.rnd, self.observe = topo, tmp, rnd, observe
        self.observed = bool(observe)
        self.name = "nftdivert" if observe else "nftdivert-quiet"
        self.cfg = tmp / "nftdivert.toml"
        self.log = tmp / f"conversations-{self.name}-{rnd}.jsonl"
        self.pcap = tmp / f"capture-{rnd}.pcap"
        self.err = tmp / f"{self.name}-{rnd}.stderr"
        self.proc: subprocess.Popen | None = None
        self.backend = self.reason = ""
        ino = os.stat(netns.NETNS_DIR / topo.divert.name).st_ino  # as runner names it, from inside
        self.stats_file = Path("/run/nftdivert") / f"nftdivert-{ino}.json"

    def start(self) -> None:
        # The default config, queue backend left to auto; a stop takes containment too,
        # so the kernel-only side and the check below find nothing of ours. No
        # admission limit: one client address opens thousands of connections a
        # second here, and the bench measures the data path, not the share.
        self.cfg.write_text('containment_after_stop = "remove"\n[queue]\nbackend = "auto"\n'
                            'new_tcp_per_source = 0\nnew_udp_per_source = 0\n')
        observe = (["--log", str(self.log), "--log-format", "json"] if "log" in self.observe else ["--log", ""]) \
            + (["-w", str(self.pcap)] if "pcap" in self.observe else [])
        argv = [*nftdivert_argv(), "run", "-c", str(self.cfg), *observe]
        with open(self.err, "wb") as err:
            self.proc = self.topo.divert.popen(*argv, stdout=subprocess.DEVNULL, stderr=err,
                                               stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.err.read_text(errors="replace")
            m = re.search(r"queue backend (\S+) \((.*)\)", text)
            if m and "diverting unbound ports" in text:
                self.backend, self.reason = m.group(1), m.group(2)
                time.sleep(0.2)
                return
            if self.proc.poll() is not None:
                raise BenchError(f"nftdivert run exited {self.proc.returncode} while starting:\n{text.strip()}")
            time.sleep(0.05)
        raise BenchError(f"nftdivert run not ready after 30s:\n{self.err.read_text(errors='replace').strip()}")

    def counters(self, after_wall: float | None = None) -> dict | None:
        """The worker's counters from its stats file (written once a second)."""
        deadline = time.monotonic() + 3
        while True:
            try:
                snap = json.loads(self.stats_file.read_text())
                if after_wall is None or snap["updated"] > after_wall:
                    return snap["packets"]
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def stop(self) -> dict:
        assert self.proc is not None
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise BenchError("nftdivert run did not stop within 20s of SIGTERM") from None
        text = self.err.read_text(errors="replace")
        if rc != 0:
            raise BenchError(f"nftdivert run exited {rc}:\n{text.strip()}")
        m = re.search(r"packets seen (\d+), rewritten (\d+), passed (\d+), malformed (\d+), errors (\d+)", text)
        names = ("seen", "rewritten", "passed", "malformed", "errors")
        final = dict(zip(names, map(int, m.groups()), strict=True)) if m else {}
        if final.get("errors"):
            raise BenchError(f"nftdivert counted {final['errors']} packet errors: {m.group(0)}")
        # It must leave nothing behind in the diverter.
        if "nftdivert" in self.topo.divert.run("nft", "list", "tables", check=False).stdout:
            raise BenchError("nftdivert's table is still loaded after it stopped")
        info: dict = {"final": final}
        if "pcap" in self.observe:
            info["capture"] = self._capture(text)
        if "log" in self.observe:
            info.update(self._log())
        return info

    def _capture(self, text: str) -> dict:
        m = re.search(r"capture \S+: (\d+) packets, (\d+) overruns \(packets lost\); its reader used ([\d.]+) s CPU",
                      text)
        if not m:
            raise BenchError(f"nftdivert said nothing about its capture:\n{text.strip()}")
        return {"packets": int(m.group(1)), "overruns": int(m.group(2)), "cpu_seconds": float(m.group(3)),
                "bytes": self.pcap.stat().st_size}

    def _log(self) -> dict:
        log_tcp = 0
        targets = set()
        if self.log.exists():
            for line in self.log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("protocol") == "tcp" and rec.get("event") == "start":
                    log_tcp += 1
                    targets.add(rec.get("original_destination"))
        return {"log_tcp_conversations": log_tcp, "log_targets": targets}


class KernelSide:
    name = "kernel"

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.topo.divert.run("nft", "-f", "-", input=REF_TABLE)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = self.topo.divert.popen(sys.executable, "-c", ECHO_SERVER, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.proc.kill()
            raise BenchError(f"echo server did not start: {self.proc.stderr.read().decode(errors='replace')}")

    def counters(self, after_wall: float | None = None) -> None:
        return None

    def stop(self) -> dict:
        assert self.proc is not None
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise BenchError("echo server did not stop within 15s") from None
        self.topo.divert.run("nft", "delete", "table", "inet", "ref")
        if self.proc.returncode != 0:
            raise BenchError(f"echo server exited {self.proc.returncode}: {err.decode(errors='replace')}")
        return {}
