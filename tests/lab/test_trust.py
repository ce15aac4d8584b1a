"""The sandbox's trust in the CA: a copy of /etc/ssl whose bundle holds it."""

from __future__ import annotations

from nftdivert.lab import trust

CA = b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n"


def test_the_copy_has_the_system_bundle_then_the_ca_and_no_private_keys(tmp_path):
    system = tmp_path / "etc-ssl"
    (system / "certs").mkdir(parents=True)
    (system / "private").mkdir()
    (system / "private" / "key.pem").write_text("secret")
    (system / "openssl.cnf").write_text("cnf")
    (system / "certs" / "ca-certificates.crt").write_bytes(b"SYSTEM")  # no final newline
    (system / "certs" / "abcd.0").symlink_to("/usr/share/ca-certificates/x.crt")
    env = trust.install(tmp_path / "netns", CA, system)
    copy = tmp_path / "netns" / "ssl"
    assert (copy / "certs" / "ca-certificates.crt").read_bytes() == b"SYSTEM\n" + CA
    assert (copy / "certs" / "ca-certificates.crt").stat().st_mode & 0o777 == 0o644
    assert (system / "certs" / "ca-certificates.crt").read_bytes() == b"SYSTEM"  # the system's is untouched
    assert not (copy / "private").exists() and (copy / "openssl.cnf").read_text() == "cnf"
    assert (copy / "certs" / "abcd.0").is_symlink()
    # Inside, the copy is mounted over /etc/ssl: the variables name the usual path.
    assert env == {name: str(system / "certs" / "ca-certificates.crt") for name in trust.VARIABLES}
    assert set(env) == {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"}


def test_a_system_bundle_that_is_a_symlink_is_replaced_not_written_through(tmp_path):
    system = tmp_path / "etc-ssl"
    (system / "certs").mkdir(parents=True)
    real = tmp_path / "real.crt"
    real.write_bytes(b"SYSTEM\n")
    (system / "certs" / "ca-certificates.crt").symlink_to(real)
    trust.install(tmp_path / "netns", CA, system)
    assert real.read_bytes() == b"SYSTEM\n"
    assert (tmp_path / "netns" / "ssl" / "certs" / "ca-certificates.crt").read_bytes() == b"SYSTEM\n" + CA


def test_without_an_etc_ssl_the_variables_name_the_bundle_itself(tmp_path):
    env = trust.install(tmp_path / "netns", CA, tmp_path / "none")
    bundle = tmp_path / "netns" / "ssl" / "certs" / "ca-certificates.crt"
    assert bundle.read_bytes() == CA and set(env.values()) == {str(bundle)}
