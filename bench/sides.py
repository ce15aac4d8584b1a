"""The sides measured, each in the diverter namespace, each answering on TCP 1337.

  kernel      one nat rule `redirect to :1337`, no nftdivert: the reference
  kernel path `nftdivert run` with divert_path = "kernel": no packet reaches userspace
  queue path  `nftdivert run` with divert_path = "queue": every diverted packet through NFQUEUE
  observed    one of the paths with the conversation log, the pcap or both on (--observe)

The paths run quiet (--log "", no -w) unless observed. All answer with the
same echo listener code (nftdivert.services.listeners.Listeners). A side has
start(), processes() (what its CPU time is sampled from), counters() (the
worker's packet counters, or None) and stop(), which checks that it left
nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import cpu
from common import REPO, BenchError
from topology import LISTEN_PORT, Topology

from nftdivert.config import Config
from nftdivert.lab import netns

REF_TABLE = """\
table inet ref {
	chain p {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type != local meta l4proto tcp redirect to :1337
	}
}
"""

# The kernel side's listener: the very Listeners nftdivert runs, alone.
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


CONVERSATION_COUNTERS = {"client_port_clashes": r"client port clashes (\d+)", "kernel_remaps": r"kernel remaps (\d+)",
                         "evicted_cap": r"cap (\d+)\)", "log_lines_dropped": r"log lines \d+ \(dropped (\d+)",
                         "conntrack_event_overruns": r"conntrack event overruns (\d+)"}

# Before divert_path existed, the queue path was the only one, and the key is refused.
HAS_DIVERT_PATH = "divert_path" in {f.name for f in fields(Config)}


class NftdivertSide:
    """`nftdivert run` on one divert path, quiet (neither log nor pcap) or observed (`observe`: either or both)."""

    def __init__(self, topo: Topology, tmp: Path, rnd: int, path: str, observe: tuple[str, ...] = (),
                 extra_config: str = "", name: str = "") -> None:
        self.topo, self.tmp, self.rnd, self.path, self.observe = topo, tmp, rnd, path, observe
        self.observed = bool(observe)
        self.extra_config = extra_config  # more TOML after the [queue] table (the lab's listeners)
        self.name = name or f"{path} path" + (" observed" if observe else "")
        slug = self.name.replace(" ", "-")
        self.cfg = tmp / f"{slug}.toml"
        self.log = tmp / f"conversations-{slug}-{rnd}.jsonl"
        self.pcap = tmp / f"capture-{slug}-{rnd}.pcap"
        self.err = tmp / f"{slug}-{rnd}.stderr"
        self.proc: subprocess.Popen | None = None
        self.backend = self.reason = ""
        ino = os.stat(netns.NETNS_DIR / topo.divert.name).st_ino  # as runner names it, from inside
        self.stats_file = Path("/run/nftdivert") / f"nftdivert-{ino}.json"

    def start(self) -> None:
        if not HAS_DIVERT_PATH and self.path != "queue":
            raise BenchError(f"this nftdivert has no divert_path setting: no {self.name} to measure "
                             "(--paths queue measures the queue path alone)")
        # The default config, queue backend left to auto; a stop takes containment too,
        # so the kernel side and the check in stop() find nothing of ours. No
        # admission limit: one client address opens thousands of connections a
        # second here, and the bench measures the data path, not the share.
        path = f'divert_path = "{self.path}"\n' if HAS_DIVERT_PATH else ""
        self.cfg.write_text(f'{path}containment_after_stop = "remove"\n[queue]\nbackend = "auto"\n'
                            'new_tcp_per_source = 0\nnew_udp_per_source = 0\n' + self.extra_config)
        observe = (["--log", str(self.log), "--log-format", "json"] if "log" in self.observe else ["--log", ""]) \
            + (["-w", str(self.pcap)] if "pcap" in self.observe else [])
        argv = [*nftdivert_argv(), "run", "-c", str(self.cfg), *observe]
        with open(self.err, "wb") as err:
            self.proc = self.topo.divert.popen(*argv, stdout=subprocess.DEVNULL, stderr=err,
                                               stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.err.read_text(errors="replace")
            if "diverting unbound ports" in text:
                m = re.search(r"queue backend (\S+) \((.*)\)", text)
                self.backend, self.reason = (m.group(1), m.group(2)) if m else ("", "")
                time.sleep(0.2)
                return
            if self.proc.poll() is not None:
                raise BenchError(f"nftdivert run exited {self.proc.returncode} while starting:\n{text.strip()}")
            time.sleep(0.05)
        raise BenchError(f"nftdivert run not ready after 30s:\n{self.err.read_text(errors='replace').strip()}")

    def processes(self) -> cpu.Processes:
        assert self.proc is not None  # `ip netns exec` execs: its pid is nftdivert's
        return cpu.Processes.of_run(self.proc.pid, LISTEN_PORT)

    def counters(self, after_wall: float | None = None) -> dict | None:
        """The worker's counters from its stats file (written once a second); None if it has none."""
        deadline = time.monotonic() + (3 if after_wall else 1)
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
        # "packets seen N, rewritten N, ...; conversations ...": the packet counters, by name.
        m = re.search(r"packets seen [^;\n]*", text)
        final = {k: int(v) for k, v in re.findall(r"([a-z]+) (\d+)", m.group(0))} if m else {}
        if final.get("errors"):
            raise BenchError(f"nftdivert counted {final['errors']} packet errors: {m.group(0)}")
        # It must leave nothing behind in the diverter.
        if "nftdivert" in self.topo.divert.run("nft", "list", "tables", check=False).stdout:
            raise BenchError("nftdivert's table is still loaded after it stopped")
        info: dict = {"final": final}
        # How often one client port served two conversations (the worker's alias, the kernel's remap).
        info["final"].update({k: int(m[1]) for k, pattern in CONVERSATION_COUNTERS.items()
                              if (m := re.search(pattern, text))})
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

    def processes(self) -> cpu.Processes:
        assert self.proc is not None
        return cpu.Processes({"listener": [self.proc.pid]})  # the echo server is the listener here

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
