"""Make the sandbox's CMD trust the CA that TLS answers chain to.

`ip netns exec` mounts what /etc/netns/<namespace>/ holds over /etc, so a
copy of /etc/ssl whose bundle also holds the CA replaces the system's in
CMD's mount namespace only. The variables that OpenSSL, Python requests,
curl and Node read name that bundle too, for programs that bring their own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SYSTEM_SSL = Path("/etc/ssl")
BUNDLE = Path("certs/ca-certificates.crt")  # Debian's and Ubuntu's system bundle, under /etc/ssl
VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")


def bundle(system: bytes, ca_pem: bytes) -> bytes:
    """The system's bundle with the CA after it."""
    if system and not system.endswith(b"\n"):
        system += b"\n"
    return system + ca_pem


def install(etc_netns: Path, ca_pem: bytes, system_ssl: Path = SYSTEM_SSL) -> dict[str, str]:
    """Write <etc_netns>/ssl with the CA in its bundle; the environment variables that name it."""
    ssl_dir = etc_netns / "ssl"
    if system_ssl.is_dir():
        # The private keys stay out: CMD runs as the invoking user and needs none of them.
        shutil.copytree(system_ssl, ssl_dir, symlinks=True, ignore=shutil.ignore_patterns("private"))
    target = ssl_dir / BUNDLE
    try:
        system = (system_ssl / BUNDLE).read_bytes()
    except OSError:
        system = b""
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    target.unlink(missing_ok=True)  # a symlink in some systems' /etc/ssl: replaced, not followed
    target.write_bytes(bundle(system, ca_pem))
    target.chmod(0o644)
    # Inside, /etc/ssl is the copy, if there was an /etc/ssl to mount it over.
    seen = system_ssl / BUNDLE if system_ssl.is_dir() else target
    return {name: str(seen) for name in VARIABLES}
