"""The smallest files of the container formats a stage may be: PDF, JPEG, GIF,
ICO, ELF, OLE compound files (doc, xls, msi) and zip packages (docx, xlsx,
jar, apk). Built here, byte by byte, so each one is a well-formed file
of its format: `file(1)` names it, and a parser opens it.
"""

from __future__ import annotations

import io
import struct
import zipfile

_ZIP_TIME = (2024, 1, 1, 0, 0, 0)  # fixed, so every run serves the same bytes


def pdf() -> bytes:
    """One empty page, with a cross-reference table whose offsets are right."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def jpeg() -> bytes:
    """A 1x1 grey baseline JFIF: one block whose DC difference and AC coefficients are all zero."""
    def segment(marker: int, body: bytes) -> bytes:
        return struct.pack("!BBH", 0xFF, marker, len(body) + 2) + body

    jfif = b"JFIF\0" + struct.pack("!BBBHHBB", 1, 1, 0, 1, 1, 0, 0)
    quant = b"\x00" + b"\x01" * 64
    frame = struct.pack("!BHHB", 8, 1, 1, 1) + b"\x01\x11\x00"
    # Each table has one code of length 1: DC category 0, AC end of block.
    dc = b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00"
    ac = b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00"
    scan = b"\x01\x01\x00\x00\x3f\x00"
    data = b"\x3f"  # the two 1-bit codes "0" "0", padded with ones
    return (b"\xff\xd8" + segment(0xE0, jfif) + segment(0xDB, quant) + segment(0xC0, frame)
            + segment(0xC4, dc) + segment(0xC4, ac) + segment(0xDA, scan) + data + b"\xff\xd9")


def gif() -> bytes:
    """A 1x1 GIF89a: a two-colour table and one LZW-coded pixel."""
    screen = struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\xff\xff\xff\x00\x00\x00"
    image = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + image + b";"


def ico(png: bytes) -> bytes:
    """An icon directory of one 1x1 32-bit image stored as PNG (as Windows Vista and later read it)."""
    entry = struct.pack("<BBBBHHII", 1, 1, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def elf() -> bytes:
    """An x86-64 ELF executable of one segment that calls exit(0)."""
    code = b"\xb8\x3c\x00\x00\x00\x31\xff\x0f\x05"  # mov eax, 60 (exit); xor edi, edi; syscall
    base, start = 0x400000, 64 + 56
    size = start + len(code)
    header = (b"\x7fELF\x02\x01\x01" + b"\0" * 9
              + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, base + start, 64, 0, 0, 64, 56, 1, 64, 0, 0))
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return header + program + code


# Root storage class ids, little-endian GUIDs: what an OLE reader (and file(1)) calls the document.
CLSID_WORD = bytes.fromhex("0609020000000000c000000000000046")
CLSID_EXCEL = bytes.fromhex("2008020000000000c000000000000046")
CLSID_MSI = bytes.fromhex("84100c0000000000c000000000000046")

_FREE, _END, _FAT, _NONE = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF


def compound(clsid: bytes, stream_name: str, stream: bytes) -> bytes:
    """An OLE compound file (version 3, 512-byte sectors): a root storage holding one stream.

    The stream is padded to 4096 bytes, the mini-stream cutoff, so it lives in
    ordinary sectors and the file needs no mini FAT.
    """
    stream = stream.ljust(4096, b"\0")
    sectors = len(stream) // 512
    header = (bytes.fromhex("d0cf11e0a1b11ae1") + b"\0" * 16
              + struct.pack("<HHHHH6sIIIIIIIII", 0x3E, 3, 0xFFFE, 9, 6, b"", 0, 1, 1, 0, 4096, _END, 0, _END, 0)
              + struct.pack("<I", 0) + struct.pack("<I", _FREE) * 108)
    chain = [_FAT, _END] + [2 + i + 1 for i in range(sectors - 1)] + [_END]
    fat = struct.pack(f"<{len(chain)}I", *chain).ljust(512, b"\xff")

    def entry(name: str, kind: int, child: int, clsid_: bytes, start: int, size: int) -> bytes:
        encoded = (name + "\0").encode("utf-16-le") if name else b""
        return (encoded.ljust(64, b"\0") + struct.pack("<HBBIII", len(encoded), kind, 1, _NONE, _NONE, child)
                + clsid_.ljust(16, b"\0") + struct.pack("<IQQIQ", 0, 0, 0, start, size))

    directory = (entry("Root Entry", 5, 1, clsid, _END, 0) + entry(stream_name, 2, _NONE, b"", 2, len(stream))
                 + entry("", 0, _NONE, b"", 0, 0) * 2)
    return header + fat + directory + stream


def summary_information(title: str) -> bytes:
    """A "\\x05SummaryInformation" property set holding only a title (what an MSI reader shows first)."""
    text = title.encode("ascii") + b"\0"
    value = struct.pack("<II", 0x1E, len(text)) + text.ljust(-(-len(text) // 4) * 4, b"\0")  # VT_LPSTR
    section = struct.pack("<IIII", 16 + len(value), 1, 2, 16) + value  # PIDSI_TITLE at offset 16
    fmtid = bytes.fromhex("e0859ff2f94f6810ab9108002b27b3d9")
    return struct.pack("<HHI", 0xFFFE, 0, 0x00020006) + b"\0" * 16 + struct.pack("<I", 1) + fmtid + \
        struct.pack("<I", 48) + section


def package(entries: list[tuple[str, bytes]], jar: bool = False) -> bytes:
    """A zip of these entries, in this order (readers and file(1) look at the first names)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for number, (name, data) in enumerate(entries):
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            if jar and number == 0:
                info.extra = b"\xfe\xca\x00\x00"  # the JAR marker on the first entry
            z.writestr(info, data)
    return out.getvalue()


_CT = "http://schemas.openxmlformats.org/package/2006/content-types"
_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
_DOC = "http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"


def ooxml(kind: str) -> bytes:
    """The smallest docx ("word") or xlsx ("xl") an Office reader opens: one empty paragraph or sheet."""
    if kind == "word":
        main, body, content = "word/document.xml", (
            '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
            '<w:body><w:p/></w:body></w:document>'), "wordprocessingml.document.main+xml"
        extra: list[tuple[str, bytes]] = []
    else:
        main, body, content = "xl/workbook.xml", (
            '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" xmlns:r='
            '"http://schemas.openxmlformats.org/officeDocument/2006/relationships"><sheets>'
            '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'), "spreadsheetml.sheet.main+xml"
        extra = [("xl/_rels/workbook.xml.rels", (
            f'<Relationships xmlns="{_REL}"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/'
            'officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>').encode()),
            ("xl/worksheets/sheet1.xml", b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/'
                                         b'main"><sheetData/></worksheet>')]
    sheet = ('<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-'
             'officedocument.spreadsheetml.worksheet+xml"/>') if extra else ""
    types = (f'<Types xmlns="{_CT}"><Default Extension="rels" ContentType="application/vnd.openxmlformats-'
             f'package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
             f'<Override PartName="/{main}" ContentType="application/vnd.openxmlformats-officedocument.{content}"/>'
             f'{sheet}</Types>')
    rels = f'<Relationships xmlns="{_REL}"><Relationship Id="rId1" Type="{_DOC}" Target="{main}"/></Relationships>'
    return package([("[Content_Types].xml", types.encode()), ("_rels/.rels", rels.encode()), (main, body.encode()),
                    *extra])
