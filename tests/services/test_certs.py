"""The CA and its leaf certificates, checked by a real TLS handshake in memory."""

from __future__ import annotations

import os
import ssl
import tempfile

import pytest
from cryptography import x509

from nftdivert.errors import NftDivertError
from nftdivert.services import certs


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return certs.ensure_ca(tmp_path_factory.mktemp("state") / "nd")


def handshake(server: ssl.SSLContext, ca_pem: bytes, sni: str | None, check_hostname: bool = True):
    """A client that trusts only `ca_pem` against `server`; returns the server's leaf."""
    client = ssl.create_default_context(cadata=ca_pem.decode())
    client.check_hostname = check_hostname
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname=sni)
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (cli, srv):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cli.do_handshake()
    return x509.load_der_x509_certificate(cli.getpeercert(binary_form=True))


def test_the_ca_is_made_once_in_a_private_directory(ca):
    directory = ca.cert_path.parent
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "ca.key").stat().st_mode & 0o777 == 0o600
    again = certs.ensure_ca(directory)
    assert again.pem == ca.pem  # the same CA, not a new one each start
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and b"nftdivert" not in ca.pem.lower() and "nftdivert" not in ca.cert.subject.rfc4514_string()


def test_a_directory_someone_else_owns_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(NftDivertError, match="tls.state_dir.*owned by uid 65534"):
        certs.ensure_ca(other)


def test_a_leaf_names_the_sni_and_chains_to_the_ca(ca):
    contexts = certs.Contexts(ca)
    # The handshake starts on the address's context; the SNI callback swaps in the name's.
    leaf = handshake(contexts.get(None, "192.0.2.9"), ca.pem, "c2.example")
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["c2.example"]
    assert leaf.issuer == ca.cert.subject


def test_without_sni_the_leaf_names_the_address(ca):
    contexts = certs.Contexts(ca)
    leaf = handshake(contexts.get(None, "192.0.2.9"), ca.pem, None, check_hostname=False)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["192.0.2.9"]


@pytest.mark.parametrize("name, kind, value", [
    ("C2.Example.", x509.DNSName, "c2.example"),
    ("198.51.100.7", x509.IPAddress, "198.51.100.7"),  # an address as SNI: named as the address
    ("bad name\n", x509.IPAddress, "192.0.2.1"),
    ("é.example", x509.IPAddress, "192.0.2.1"),
    ("", x509.IPAddress, "192.0.2.1"),
    ("a" * 300, x509.IPAddress, "192.0.2.1"),
])
def test_subject_for(name, kind, value):
    subject = certs.subject_for(name, "192.0.2.1")
    assert isinstance(subject, kind) and str(subject.value) == value


def test_the_cache_is_bounded_and_least_recently_used_goes_first(ca):
    contexts = certs.Contexts(ca, limit=2)
    a = contexts.get("a.example", "192.0.2.1")
    contexts.get("b.example", "192.0.2.1")
    assert contexts.get("a.example", "192.0.2.1") is a  # cached, and now the most recent
    contexts.get("c.example", "192.0.2.1")
    assert len(contexts) == 2
    assert contexts.get("a.example", "192.0.2.1") is a  # b went, not a


def test_the_key_log_is_created_private_and_gets_the_session_keys(ca, tmp_path):
    keylog = tmp_path / "keys.log"
    contexts = certs.Contexts(ca, keylog=str(keylog))
    assert keylog.stat().st_mode & 0o777 == 0o600
    handshake(contexts.get(None, "192.0.2.9"), ca.pem, "k.example")
    lines = keylog.read_text().splitlines()
    assert any(line.startswith("CLIENT_TRAFFIC_SECRET_0 ") for line in lines)
    assert keylog.stat().st_mode & 0o777 == 0o600


def test_no_leaf_file_outlives_its_load(ca, tmp_path, monkeypatch):
    # Before: each Contexts kept a /tmp/leaf-* directory for its process's life, and a killed
    # listener process left it behind (hundreds after a test suite).
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    contexts = certs.Contexts(ca, limit=2)
    for name in ("a.example", "b.example", "c.example", "a.example"):
        contexts.get(name, "192.0.2.1")
    assert list(scratch.iterdir()) == []
