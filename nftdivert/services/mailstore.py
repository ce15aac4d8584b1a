"""Keep what a client handed over (a mail, an upload) under a directory, named by its sha256."""

from __future__ import annotations

import hashlib
import os
import tempfile
from email.parser import BytesHeaderParser
from email.policy import compat32

MAX_HEADERS = 100
MAX_VALUE = 1024


def headers(data: bytes) -> list[list[str]]:
    """A message's header fields as [name, value] pairs, bounded."""
    msg = BytesHeaderParser(policy=compat32).parsebytes(data)
    return [[name, str(value)[:MAX_VALUE]] for name, value in list(msg.items())[:MAX_HEADERS]]


def keep(directory: str, data: bytes, suffix: str = "") -> dict:
    """The log fields for `data`: size, sha256, and where it was saved (or why not)."""
    digest = hashlib.sha256(data).hexdigest()
    info: dict = {"size": len(data), "sha256": digest}
    if not directory:
        return info
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".part-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        path = os.path.join(directory, digest + suffix)
        os.replace(tmp, path)
        info["saved"] = path
    except OSError as exc:  # a full disk costs the copy, not the answer
        info["save_error"] = f"{directory}: {exc.strerror or exc}"
    return info
