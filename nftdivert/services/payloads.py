"""Small, valid files for the HTTP and TFTP answers, by the extension the client asked for.

A sample that downloads its next stage checks what it got: a PE that
parses, a PNG that decodes, a zip that opens. These are the smallest such
files; a config rule (`[[http.rules]]`) serves a real one instead.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from functools import lru_cache

from nftdivert.services import documents


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    ihdr = struct.pack("!IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\xff\xff\xff"))
            + chunk(b"IEND", b""))


def pe(dll: bool = False) -> bytes:
    """A PE32 (i386) image of one .text section that does nothing and returns.

    The exe's entry point returns 0; the dll's DllMain returns TRUE.
    """
    code = b"\xb8\x01\x00\x00\x00\xc2\x0c\x00" if dll else b"\x31\xc0\xc3"
    dos = b"MZ" + b"\0" * 58 + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", 0x14C, 1, 0, 0, 0, 0xE0, 0x0102 | (0x2000 if dll else 0))
    optional = struct.pack(
        "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII", 0x10B, 14, 0, 0x200, 0, 0, 0x1000, 0x1000, 0x2000,
        0x10000000 if dll else 0x400000, 0x1000, 0x200, 6, 0, 0, 0, 6, 0, 0, 0x2000, 0x200, 0,
        2, 0x0500, 0x100000, 0x1000, 0x100000, 0x1000, 0, 16) + b"\0" * 128
    section = struct.pack("<8sIIIIIIHHI", b".text", len(code), 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020)
    headers = dos + b"PE\0\0" + coff + optional + section
    return headers.ljust(0x200, b"\0") + code.ljust(0x200, b"\0")


def _zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("readme.txt", (2024, 1, 1, 0, 0, 0)), "readme\n")
    return out.getvalue()


# Scripts do nothing, in the shape `file(1)` (and a stager's check) recognises:
# a shebang, `@echo off`, a "use strict" prologue.
_SCRIPTS = {
    "ps1": ("text/plain", b"#!/usr/bin/env pwsh\nexit 0\n"),
    "js": ("application/javascript", b'"use strict";\nvar ok = true;\n'),
    "vbs": ("text/vbscript", b'Option Explicit\r\nWScript.Quit 0\r\n'),
    "bat": ("application/x-bat", b"@echo off\r\nexit /b 0\r\n"),
    "sh": ("application/x-sh", b"#!/bin/sh\nexit 0\n"),
}
_OOXML = "application/vnd.openxmlformats-officedocument."

_TYPES = {
    "txt": ("text/plain", lambda: b"ok\n"),
    "json": ("application/json", lambda: b"{}\n"),
    "png": ("image/png", _png),
    "exe": ("application/octet-stream", pe),
    "dll": ("application/octet-stream", lambda: pe(dll=True)),
    "zip": ("application/zip", _zip),
    "pdf": ("application/pdf", documents.pdf),
    "jpg": ("image/jpeg", documents.jpeg),
    "jpeg": ("image/jpeg", documents.jpeg),
    "gif": ("image/gif", documents.gif),
    "ico": ("image/x-icon", lambda: documents.ico(_png())),
    "elf": ("application/x-executable", documents.elf),
    "doc": ("application/msword", lambda: documents.compound(documents.CLSID_WORD, "WordDocument",
                                                             b"\xec\xa5\xc1\x00")),
    "xls": ("application/vnd.ms-excel", lambda: documents.compound(documents.CLSID_EXCEL, "Workbook",
                                                                   b"\x09\x08\x10\x00\x00\x06\x05\x00")),
    "msi": ("application/x-msi", lambda: documents.compound(
        documents.CLSID_MSI, "\x05SummaryInformation", documents.summary_information("Installer"))),
    "docx": (_OOXML + "wordprocessingml.document", lambda: documents.ooxml("word")),
    "xlsx": (_OOXML + "spreadsheetml.sheet", lambda: documents.ooxml("xl")),
    "jar": ("application/java-archive", lambda: documents.package(
        [("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\r\n\r\n")], jar=True)),
    "apk": ("application/vnd.android.package-archive", lambda: documents.package(
        [("AndroidManifest.xml", b"\x03\x00\x08\x00\x08\x00\x00\x00"), ("classes.dex", b"dex\n035\0")])),
    **{ext: (kind, lambda body=body: body) for ext, (kind, body) in _SCRIPTS.items()},
}


@lru_cache(maxsize=None)
def by_extension(ext: str) -> tuple[str, bytes] | None:
    """(content type, body) for an extension ("exe"), or None: the default page."""
    entry = _TYPES.get(ext.lower())
    return (entry[0], entry[1]()) if entry else None
