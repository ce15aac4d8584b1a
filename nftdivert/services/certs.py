"""The CA and a leaf certificate for every name a TLS client asks for.

The CA is made once, on first use, and kept in a state directory that only
root can read (0700; the key 0600), so a victim VM can be told to trust it
for good (`nftdivert ca`). Leaves are made on demand, signed by the CA,
and kept in memory, the least recently used going first. The names look
like any private CA's: nothing in a certificate names nftdivert.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nftdivert.errors import NftDivertError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
_CA_NAME = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trust Services"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Trust Services Root CA")])
_DNS_NAME = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9_*]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+")


@dataclass(frozen=True)
class Ca:
    cert_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise NftDivertError(f"tls.state_dir = {str(path)!r}: owned by uid {st.st_uid}, not by us: the CA key must be ours alone")
    os.chmod(path, 0o700)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write then rename, so a reader sees the whole file or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(days=2), now + datetime.timedelta(days=days)


def ensure_ca(state_dir: str | Path) -> Ca:
    """The CA in `state_dir`, made there first if it is not."""
    directory = Path(state_dir)
    try:
        _private_dir(directory)
        cert_path, key_path = directory / CA_CERT, directory / CA_KEY
        if not (cert_path.exists() and key_path.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            start, end = _validity(3650)
            ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
            cert = (x509.CertificateBuilder().subject_name(_CA_NAME).issuer_name(_CA_NAME)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(start).not_valid_after(end)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                   critical=True)
                    .add_extension(ski, critical=False)
                    .sign(key, hashes.SHA256()))
            _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()), 0o600)
            _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise NftDivertError(f"tls.state_dir = {str(directory)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise NftDivertError(f"tls.state_dir = {str(directory)!r}: the CA there is unreadable: {exc}") from None
    return Ca(cert_path, cert, key)  # type: ignore[arg-type]


def subject_for(name: str | None, fallback_ip: str) -> x509.GeneralName:
    """What the leaf names: the SNI if it is a DNS name, else the address the client reached."""
    if name and _DNS_NAME.fullmatch(name) and name.isascii():
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name.rstrip(".").lower())
    return x509.IPAddress(ipaddress.ip_address(fallback_ip))


def leaf(ca: Ca, key: ec.EllipticCurvePrivateKey, subject: x509.GeneralName) -> x509.Certificate:
    start, end = _validity(365)
    cn = str(subject.value)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([subject]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca.key, hashes.SHA256()))


LIVE_CONTEXTS = 32  # SSLContexts kept ready; the other leaves as their PEM only


class Contexts:
    """One server SSLContext per name, made on first use.

    At most `limit` leaves are kept, as PEM (about a kilobyte: the signature
    is what costs time), and only the LIVE_CONTEXTS most recent as contexts
    (some 30 KB each, which made a thousand names 45 MB); a context is made
    again from its PEM when its name returns.
    """

    def __init__(self, ca: Ca, limit: int = 1024, keylog: str = "", alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self._ca, self._limit, self._keylog, self._alpn = ca, limit, keylog, alpn
        self._key = ec.generate_private_key(ec.SECP256R1())  # one key for every leaf: a leaf costs a signature
        self._key_pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
        self._leaves: OrderedDict[str, bytes] = OrderedDict()  # name -> its leaf's PEM
        self._cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        if keylog:  # session keys: readable by its owner only (ssl would create it world-readable)
            os.close(os.open(keylog, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))

    def __len__(self) -> int:
        return len(self._leaves)

    def base(self) -> ssl.SSLContext:
        """The context a handshake starts with; the SNI callback swaps in the name's own."""
        return self.get(None, "127.0.0.1")

    def get(self, name: str | None, fallback_ip: str) -> ssl.SSLContext:
        subject = subject_for(name, fallback_ip)
        key = str(subject.value)
        ctx = self._cache.get(key)
        if ctx is not None:
            self._cache.move_to_end(key)
            self._leaves.move_to_end(key)
            return ctx
        pem = self._leaves.get(key)
        if pem is None:
            pem = leaf(self._ca, self._key, subject).public_bytes(serialization.Encoding.PEM)
            self._leaves[key] = pem
            while len(self._leaves) > self._limit:
                self._leaves.popitem(last=False)
        else:
            self._leaves.move_to_end(key)
        ctx = self._cache[key] = self._context(pem)
        while len(self._cache) > min(LIVE_CONTEXTS, self._limit):
            self._cache.popitem(last=False)
        return ctx

    def _on_sni(self, obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        # A name that is no DNS name keeps the certificate for the address.
        if name and isinstance(subject_for(name, "0.0.0.0"), x509.DNSName):
            obj.context = self.get(name, "0.0.0.0")

    def _context(self, leaf_pem: bytes) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():  # deprecated, and still what old samples speak
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        ctx.set_alpn_protocols(list(self._alpn))
        ctx.sni_callback = self._on_sni
        if self._keylog:
            ctx.keylog_filename = self._keylog  # NSS key log: Wireshark decrypts the capture with it
        # load_cert_chain reads files only: a directory of its own (mode 0700) for the moment
        # it reads, removed at once. One kept for the process's life stayed behind whenever
        # the listener was killed, once per listener process and run.
        with tempfile.TemporaryDirectory(prefix="leaf-") as tmp:
            path = Path(tmp) / "leaf.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._key_pem + leaf_pem + self._ca.pem)
            ctx.load_cert_chain(path)
        return ctx
