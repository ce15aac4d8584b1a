"""Every program the suite and the demo run, with the Debian package it comes from.

The preflight (conftest) checks these at session start; tests/test_programs.py
checks that the table names every program the sources run, and that the
Makefile's APT_PACKAGES installs every package in it.
"""

from __future__ import annotations

import os
import shutil

PACKAGES = {
    "busybox": "busybox",
    "cat": "coreutils",
    "conntrack": "conntrack",
    "curl": "curl",
    "date": "coreutils",
    "dig": "bind9-dnsutils",
    "env": "coreutils",
    "file": "file",
    "grep": "grep",
    "head": "coreutils",
    "id": "coreutils",
    "ip": "iproute2",
    "ip6tables-nft": "iptables",
    "ip6tables-nft-restore": "iptables",
    "ip6tables-nft-save": "iptables",
    "iptables-nft": "iptables",
    "iptables-nft-restore": "iptables",
    "iptables-nft-save": "iptables",
    "logger": "bsdutils",
    "ls": "coreutils",
    "make": "make",
    "mkdir": "coreutils",
    "mount": "mount",
    "nc": "netcat-openbsd",
    "nft": "nftables",
    "ntpdate": "ntpsec-ntpdate",
    "openssl": "openssl",
    "pgrep": "procps",
    "ping": "iputils-ping",
    "python3": "python3",
    "rdate": "rdate",
    "rsyslogd": "rsyslog",
    "setpriv": "util-linux",
    "nmap": "nmap",
    "sh": "dash",
    "sleep": "coreutils",
    "ss": "iproute2",
    "ssh": "openssh-client",
    "swaks": "swaks",
    "sysctl": "procps",
    "systemd-analyze": "systemd",
    "tcpdump": "tcpdump",
    "tftp": "tftp-hpa",
    "timeout": "coreutils",
    "true": "coreutils",
    "tshark": "tshark",
    "unshare": "util-linux",
    "wget": "wget",
}

# Root's programs sit in sbin, which a non-root PATH may leave out.
_SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def missing() -> dict[str, str]:
    """The programs of the table that are not installed here, with their packages."""
    return {prog: pkg for prog, pkg in PACKAGES.items() if shutil.which(prog, path=_SEARCH) is None}


def preflight_message(absent: dict[str, str]) -> str:
    """One line: what is missing, from which package, and how to get it."""
    names = ", ".join(f"{prog} ({pkg})" for prog, pkg in sorted(absent.items()))
    pkgs = " ".join(sorted(set(absent.values())))
    return f"missing programs: {names}; `make deps` installs them (apt-get install {pkgs})"
