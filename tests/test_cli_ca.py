"""`nftdivert ca`: the CA's path and PEM, made on first use; bad input is one line."""

from __future__ import annotations

import os
import subprocess

from cryptography import x509

from conftest import nftdivert_argv


def ca(tmp_path, cli_env, state) -> subprocess.CompletedProcess:
    config = tmp_path / "c.toml"
    config.write_text(f'[tls]\nstate_dir = "{state}"\n')
    return subprocess.run(nftdivert_argv("ca", "-c", str(config)), capture_output=True, text=True, env=cli_env)


def test_ca_prints_the_path_then_the_pem_and_keeps_the_same_ca(tmp_path, cli_env):
    state = tmp_path / "state"
    first = ca(tmp_path, cli_env, state)
    assert first.returncode == 0 and first.stderr == ""
    path, pem = first.stdout.split("\n", 1)
    assert path == str(state / "ca.pem") and pem == (state / "ca.pem").read_text()
    assert x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string() \
        == "CN=Trust Services Root CA,O=Trust Services"
    assert ca(tmp_path, cli_env, state).stdout == first.stdout


def test_a_state_dir_someone_else_owns_is_one_line_and_status_1(tmp_path, cli_env):
    state = tmp_path / "theirs"
    state.mkdir()
    os.chown(state, 65534, 65534)
    proc = ca(tmp_path, cli_env, state)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"nftdivert: tls.state_dir = {str(state)!r}: owned by uid 65534, not by us: "
                           "the CA key must be ours alone\n")
    assert not (state / "ca.key").exists()


def test_ca_help_teaches_installing_it(cli_env):
    out = subprocess.run(nftdivert_argv("ca", "--help"), capture_output=True, text=True, env=cli_env).stdout
    assert "certutil -addstore -f Root ca.crt" in out and "update-ca-certificates" in out
