"""The DNS listener end to end: real `dig`, `nc` and `curl` inside `nftdivert sandbox`.

Each test runs one sandbox with a script; what the clients print goes to a
file (stdout carries the conversation log as JSON Lines). That the sandbox
leaves nothing behind is test_sandbox's to prove.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO, nftdivert_argv

# DNS answers do not depend on the queue backend: the host tier proves them.
pytestmark = [pytest.mark.kernel, pytest.mark.any_backend,
              pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (bind9-dnsutils, see the Makefile)")]

DIG = "dig +tries=1 +time=5"


def run(tmp_path, script: str, config: str = "") -> tuple[list[dict], str]:
    """Run `script` in a sandbox with `config`; returns (log records, what the script printed)."""
    out = tmp_path / "out.txt"
    cfg = tmp_path / "sandbox.toml"
    cfg.write_text(config)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(cfg), "--", "sh", "-c", f"exec >{out} 2>&1; {script}"),
                          capture_output=True, text=True, timeout=180, env=sandbox_env())
    assert proc.returncode == 0, f"{proc.stderr}\n{out.read_text() if out.exists() else ''}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], out.read_text()


def sandbox_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for sudo in ("SUDO_UID", "SUDO_GID"):  # CMD runs as root, so it may write its output anywhere
        env.pop(sudo, None)
    return env


def section(text: str, name: str) -> list[str]:
    """The lines the script printed between `== name ==` and the next marker."""
    lines = text.split(f"== {name} ==\n", 1)[1].split("== ", 1)[0]
    return [line for line in lines.splitlines() if line.strip()]


@pytest.mark.load
def test_2000_names_through_a_pool_of_254_one_name_per_address_and_recycling_logged(tmp_path):
    pool = ipaddress.ip_network("198.18.7.0/24")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"dga{i}.example A +short\n" for i in range(2000)))
    reverse = tmp_path / "reverse.txt"
    reverse.write_text("".join(f"-x {a} +short\n" for a in pool.hosts()))
    recs, out = run(tmp_path, f"""
        echo '== answers =='; {DIG} -f {names}
        echo '== ptr =='; {DIG} -f {reverse}
        echo '== conversation =='; echo hello | nc -q1 -w5 198.18.7.5 4444""",
                    config='[dns]\nanswer_v4 = "198.18.7.0/24"\n')

    answers = section(out, "answers")
    assert len(answers) == 2000 and all(ipaddress.ip_address(a) in pool for a in answers)

    # Replay the log: every time an address changes hands, a dns_recycled
    # event says so first, and no address ever stands for two names.
    owner: dict[str, str] = {}  # address -> name
    held: dict[str, str] = {}  # name -> address
    recycled = 0
    for rec in recs:
        if rec.get("event") == "dns_recycled":
            address, old, new = rec["address"], rec["old_name"], rec["new_name"]
            assert owner.get(address) == old, rec
            del held[old]
            owner[address] = new
            held[new] = address
            recycled += 1
        elif rec.get("event") == "dns" and rec["type"] == "A":
            name, address = rec["name"], rec["answer"]
            assert owner.setdefault(address, name) == name, f"{address} is {owner[address]}'s, not {name}'s"
            assert held.setdefault(name, address) == address, rec
    assert recycled == 2000 - 254
    assert answers == [r["answer"] for r in recs if r.get("event") == "dns" and r["type"] == "A"]
    assert len(owner) == 254 and len(set(owner.values())) == 254

    # The listener's map, asked by PTR: each address its one current name.
    ptr = section(out, "ptr")
    assert len(ptr) == 254
    assert {str(a): f"{owner[str(a)]}." for a in pool.hosts()} == dict(zip(map(str, pool.hosts()), ptr))
    assert owner["198.18.7.5"] == "dga1782.example"  # .5 went to dga4, dga258, ... dga1782

    # A conversation to a recycled address is logged under the name it stands for now.
    assert "hello" in section(out, "conversation")
    conv = [r for r in recs if r.get("protocol") == "tcp"]
    assert conv and conv[0]["original_destination"] == "198.18.7.5:4444"
    assert conv[0]["name"] == "dga1782.example"


def test_ptr_nxdomain_mx_txt_and_mail_that_connects(tmp_path):
    recs, out = run(tmp_path, f"""
        addr=$({DIG} +short A web.example)
        echo '== ptr =='; {DIG} +short -x "$addr"
        echo '== ptr-foreign =='; {DIG} -x 192.0.2.77 | grep status
        echo '== ptr-unused =='; {DIG} -x 198.19.200.200 | grep status
        echo '== ptr-v6 =='; {DIG} +short -x "$({DIG} +short AAAA web.example)"
        echo '== listed =='; {DIG} x.blocked.example | grep status; {DIG} MX deep.x.blocked.example | grep status
        echo '== mx =='; {DIG} +short MX corp.example
        echo '== txt =='; {DIG} +short TXT corp.example
        echo '== ns =='; {DIG} +short NS corp.example
        echo '== soa =='; {DIG} +short SOA corp.example
        echo '== cname =='; {DIG} +short CNAME www.corp.example
        mx=$({DIG} +short MX corp.example | cut -d' ' -f2)
        echo '== mail =='; printf 'EHLO sample\\r\\n' | nc -4 -q1 -w5 "${{mx%.}}" 25""",
                    config='[dns]\nnxdomain = ["*.blocked.example"]\ntxt = "v=spf1 include:_spf.corp.example ~all"\n')

    assert section(out, "ptr") == ["web.example."]
    assert section(out, "ptr-v6") == ["web.example."]
    for name in ("ptr-foreign", "ptr-unused"):
        assert "status: NXDOMAIN" in section(out, name)[0], out
    assert [("status: NXDOMAIN" in line) for line in section(out, "listed")] == [True, True], out
    assert section(out, "mx") == ["10 mail.corp.example."]
    assert section(out, "txt") == ['"v=spf1 include:_spf.corp.example ~all"']
    assert sorted(section(out, "ns")) == ["ns1.corp.example.", "ns2.corp.example."]
    soa = section(out, "soa")[0].split()
    assert soa[:2] == ["ns1.corp.example.", "hostmaster.corp.example."] and len(soa) == 7
    cname = section(out, "cname")
    assert ipaddress.ip_address(cname[0]) in ipaddress.ip_network("198.18.0.0/15")

    # The mail sample goes on: its connection to the MX target's port 25 is answered and named.
    mail = section(out, "mail")  # an early EHLO on 25 gets SMTP: the greeting, then the EHLO's answer
    assert mail[0].startswith("220 ") and any(line.startswith("250") for line in mail[1:]), mail
    mail = [r for r in recs if r.get("protocol") == "tcp" and r["original_destination"].endswith(":25")]
    assert mail and mail[0]["name"] == "mail.corp.example", recs
    mail_address = next(r["answer"] for r in recs if r.get("event") == "dns" and r["name"] == "mail.corp.example"
                        and r["type"] == "A")
    assert mail[0]["original_destination"] == f"{mail_address}:25"
    # Every question is in the log, NXDOMAIN ones with their rcode.
    asked = {(r["type"], r["name"], r["rcode"]) for r in recs if r.get("event") == "dns"}
    assert {("MX", "corp.example", "NOERROR"), ("TXT", "corp.example", "NOERROR"),
            ("A", "x.blocked.example", "NXDOMAIN"), ("PTR", "77.2.0.192.in-addr.arpa", "NXDOMAIN")} <= asked


def test_nothing_a_client_sees_names_nftdivert_and_a_configured_server_header_shows(tmp_path):
    types = " ".join(f"{t} probe.example" for t in ("A", "AAAA", "MX", "NS", "SOA", "TXT", "CNAME", "HINFO"))
    _, out = run(tmp_path, f"""
        echo '== http =='; curl -sS -i --max-time 10 http://probe.example/
        curl -sS -i --max-time 10 -6 http://probe.example:8080/x
        echo '== echo =='; echo ping | nc -q1 -w5 198.51.100.7 45678
        echo '== dns =='; {DIG} {types} ; {DIG} +tcp TXT probe.example; {DIG} -x 198.18.0.1
        echo '== resolv =='; cat /etc/resolv.conf
        echo '== env =='; env""")
    head = section(out, "http")
    assert "HTTP/1.1 200 OK" in head[0] and "Server: nginx" in [line.strip() for line in head]
    dig = section(out, "dns")
    assert sum("status: NOERROR" in line for line in dig) == 10, out
    assert any(line.startswith("1.0.18.198.in-addr.arpa.") and line.endswith("probe.example.") for line in dig)
    env_passed = {f"{k}={v}" for k, v in sandbox_env().items()}
    seen = [line for name in ("http", "echo", "dns", "resolv") for line in section(out, name)]
    seen += [line for line in section(out, "env") if line not in env_passed]  # what the sandbox added
    assert not [line for line in seen if "nftdivert" in line.lower()], out

    _, out = run(tmp_path, "echo '== http =='; curl -sS -I --max-time 10 http://probe.example/",
                 config='[http]\nserver = "Apache/2.4.41 (Ubuntu)"\n')
    assert "Server: Apache/2.4.41 (Ubuntu)" in [line.strip() for line in section(out, "http")]


def test_two_diverters_with_one_pool_key_give_each_name_the_same_address(tmp_path):
    """Two sandboxes, each with its own DNS listener, asked 300 names in opposite orders: with the
    same [dns] pool_key they agree (but on a name whose own address another name asked earlier
    held), and each answers what a pool object with that key says (A and AAAA)."""
    from nftdivert.services.names import AnswerPool

    names = [f"fleet{i}.example" for i in range(300)]
    config = '[dns]\npool_key = "lab-fleet-7"\n'
    answers = []
    for order in (names, names[::-1]):
        questions = tmp_path / "names.txt"
        questions.write_text("".join(f"{n} A +short\n{n} AAAA +short\n" for n in order))
        _, out = run(tmp_path, f"echo '== answers =='; {DIG} -f {questions}", config=config)
        got = section(out, "answers")
        assert len(got) == 600, out
        v4 = AnswerPool(ipaddress.ip_network("198.18.0.0/15"), key="lab-fleet-7")
        v6 = AnswerPool(ipaddress.ip_network("2001:db8:53::/64"), key="lab-fleet-7")
        assert got == [str(pool.address_for(n)) for n in order for pool in (v4, v6)]
        answers.append(dict(zip([(n, t) for n in order for t in "A6"], got)))
    differ = [q for q in answers[0] if answers[0][q] != answers[1][q]]
    assert len(differ) <= 6, differ  # collisions only: a few pairs among 300 names in a /15


def test_a_question_from_a_client_port_used_again_names_the_client_port_the_client_used(tmp_path):
    """One client port asks two resolvers within conntrack's wait: the first
    entry holds the reply tuple at the DNS listener, so the kernel gives the
    second another client port. Its question names the port the client used,
    as its start does; the one the listener saw is listener_client_port."""
    import harness

    recs, out = run(tmp_path, f"""
        {DIG} +short -b 0.0.0.0#24111 @198.51.100.50 first.example A
        {DIG} +short -b 0.0.0.0#24111 @198.51.100.51 second.example A""", config=harness.DIVERT_PATH_LINE)
    starts = {r["original_destination"]: r for r in recs if r["event"] == "start" and r["client"].endswith(":24111")}
    assert set(starts) == {"198.51.100.50:53", "198.51.100.51:53"}, out
    questions = {r["name"]: r for r in recs if r["event"] == "dns" and r["name"] in ("first.example", "second.example")}
    first, second = questions["first.example"], questions["second.example"]
    assert first["client"] == starts["198.51.100.50:53"]["client"] and "listener_client_port" not in first, first
    assert second["client"] == starts["198.51.100.51:53"]["client"], (second, starts)
    assert second["listener_client_port"] == starts["198.51.100.51:53"]["listener_client_port"] != 24111, second
