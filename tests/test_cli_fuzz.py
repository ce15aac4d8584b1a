"""Fuzzing every command that reads a config or a ruleset: random bytes and
random TOML-shaped text (real keys, wrong types, odd values, then cut or
garbled). Every case must end in exit 0, 1 or 2, with no traceback, inside a
fixed memory cap.

The cases run in one child process, in a network namespace of its own (apply
and diff load what they are given), under RLIMIT_AS: a case that would
exhaust memory fails there instead of on this machine. The child calls the
CLI's entry point in-process, so hundreds of cases take seconds. Run as a
script (python test_cli_fuzz.py EXAMPLES WORKDIR) this file is that child.
"""

from __future__ import annotations

import json
import os
import resource
import string
import subprocess
import sys
import traceback
from dataclasses import fields
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MEMORY_CAP = 1 << 30  # RLIMIT_AS of the child: address space, well above what it needs
RSS_CAP = 256 << 20  # what the child may really use, at most (it needs about 60 MiB)
EXAMPLES = 200


@pytest.mark.kernel
def test_no_config_or_ruleset_makes_a_command_crash_or_grow(make_netns, tmp_path):
    ns = make_netns("fuzz")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    proc = subprocess.Popen(ns.argv(sys.executable, __file__, str(EXAMPLES), str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=cap,
                            env=dict(os.environ, PYTHONPATH=f"{REPO}:{HERE}"))
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    current = tmp_path / "current.json"
    assert proc.returncode == 0, (f"child exited {proc.returncode}\n{out[-6000:]}\n"
                                  f"last case: {current.read_text() if current.exists() else '?'}")
    report = json.loads(out.strip().splitlines()[-1])
    print(f"\nfuzz: {report}")
    assert sum(report["statuses"].values()) >= EXAMPLES
    assert report["maxrss_mib"] << 20 < RSS_CAP, f"the child peaked at {report['maxrss_mib']} MiB"


# ---- the child --------------------------------------------------------------------------

def _strategies():
    from hypothesis import strategies as st

    from nftdivert import config as config_mod

    words = ["gateway", "local", "both", "tcp", "udp", "echo", "dns", "external", "auto", "nft", "xt",
             "closed", "open", "keep", "remove", "nftdivert", "eth0", "veth*", "8000-8100", "9000-8000",
             "192.0.2.0/24", "192.0.2.1/24", "2001:db8::/32", "fe80::1%eth0/64", "system.slice/x.service",
             "tcp-echo", "udp-echo", "-", "", "counter", "a;b", "x" * 300]
    # A fixed alphabet (ASCII and a few traps) spares hypothesis its Unicode tables.
    text = st.text(alphabet=string.printable + "\x00\x7f\u00e9\u2028\ufeff\U0001f600", max_size=24)
    scalar = st.one_of(
        st.sampled_from(words), text, st.booleans(),
        st.integers(-3, 70_000), st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True))
    known = sorted({f.name for cls in (config_mod.Config, config_mod.Listener, *config_mod._SECTIONS.values())
                    for f in fields(cls)} | set(config_mod._SECTIONS))
    key = st.one_of(st.sampled_from(known), text)
    value = st.recursive(scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(key, inner, max_size=4)), max_leaves=12)
    listener = st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["tcp-echo", "udp-echo", "t", "u"]), scalar)},
        optional={"protocol": st.one_of(st.sampled_from(["tcp", "udp"]), scalar),
                  "port": st.one_of(st.integers(0, 70_000), scalar),
                  "kind": st.one_of(st.sampled_from(["echo", "dns", "external"]), scalar)})
    section = {name: st.dictionaries(st.one_of(st.sampled_from([f.name for f in fields(cls)]), key),
                                     value, max_size=5)
               for name, cls in config_mod._SECTIONS.items()}
    doc = st.fixed_dictionaries({}, optional={
        **{name: scalar for name in ("mode", "table", "ipv4", "ipv6", "forward_containment",
                                     "containment_after_stop", "default_tcp_listener",
                                     "default_udp_listener")},
        "interfaces": st.lists(scalar, max_size=3), "listeners": st.lists(listener, max_size=3), **section,
    }) | st.dictionaries(key, value, max_size=6)

    @st.composite
    def toml_shaped(draw) -> bytes:
        text = _toml(draw(doc)).encode()
        cut = draw(st.sampled_from(["whole", "whole", "cut", "garble"]))
        if cut == "cut" and text:
            text = text[:draw(st.integers(0, len(text)))]
        elif cut == "garble" and text:
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
        return text

    return st.one_of(st.binary(max_size=512), toml_shaped())


def _toml(doc: dict) -> str:
    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(v), repr(v))
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(map(val, v)) + "]"
        return "{ " + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + " }"

    return "".join(f"{json.dumps(k)} = {val(v)}\n" for k, v in doc.items())


def _commands(path: str) -> list[list[str]]:
    return [["render", "-c", path], ["render", "--after-stop", "--backend", "xt", "-c", path],
            ["check", "-c", path], ["check", path], ["apply", "-c", path], ["diff", "-c", path],
            ["status", "-c", path], ["remove", "-c", path],
            # run reads and checks the config, then fails on the capture path: nothing runs.
            ["run", "-c", path, "--log", "", "-w", "/nonexistent/fuzz.pcap"]]


def _invoke(argv: list[str]) -> tuple[int, str]:
    """The CLI's entry point in this process: (exit status, everything it printed)."""
    from click.testing import CliRunner

    from nftdivert import cli

    with CliRunner().isolation() as (out, err, _):
        try:
            cli.main(argv)
            status = -1  # main() always exits
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else -2
        except BaseException:  # noqa: BLE001 - what the fuzz looks for
            sys.stdout.flush()
            return -3, traceback.format_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        return status, out.getvalue().decode(errors="replace") + err.getvalue().decode(errors="replace")


def child(examples: int, workdir: Path) -> None:
    from hypothesis import HealthCheck, given, settings, strategies as st

    path = workdir / "input"
    current = workdir / "current.json"
    statuses: dict[str, int] = {}

    def one(argv: list[str], content: bytes | None) -> int:
        if content is not None:
            path.write_bytes(content)
        current.write_text(json.dumps({"argv": argv, "content": (content or b"")[:2000].decode("latin-1")}))
        status, printed = _invoke(argv)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        assert status in (0, 1, 2), f"{argv}: exit {status}\n{printed[-4000:]}"
        assert "Traceback" not in printed, f"{argv}:\n{printed[-4000:]}"
        return status

    # Fixed cases first: the ones issue #10 found, and past the read cap.
    big = [b"a = " + b"[" * 2048, b"[" * 2048, b"x = " + b"{a=" * 3000, b"\xff\xfe" * 100,
           b'mode = "' + b"g" * 900_000 + b'"', b"#" * (1024 * 1024 + 1)]
    for content in big:
        for argv in _commands(str(path)):
            one(argv, content)
    for argv in _commands("/dev/zero"):
        one(argv, None)
    # A ruleset that includes other files (/dev/zero never ends): refused unread.
    for include in (b'include "/dev/zero"\n', b'table inet x {\n\tinclude "/dev/zero"\n}\n',
                    b'flush ruleset; include \\\n"/dev/*"\n'):
        assert one(["check", str(path)], include) == 2, f"not refused as bad input: {include!r}"

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(content=_strategies(), command=st.integers(0, len(_commands("")) - 1))
    def case(content: bytes, command: int) -> None:
        one(_commands(str(path))[command], content)

    case()
    # ru_maxrss is in KiB: this process's peak, and that of the largest program it ran.
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    print(json.dumps({"statuses": statuses, "maxrss_mib": peak >> 10}))


if __name__ == "__main__":
    os.chdir(sys.argv[2])  # a config's relative paths land in the test's own directory
    child(int(sys.argv[1]), Path(sys.argv[2]))
