"""Each file served by extension is one `file(1)` names as that type, and its format's reader opens."""

from __future__ import annotations

import io
import zipfile

import pytest

from filetypes import EXPECTED, file_type
from nftdivert.services import payloads

@pytest.mark.parametrize("ext", sorted(EXPECTED))
def test_file_names_the_type_asked_for(ext, tmp_path):
    served = payloads.by_extension(ext)
    assert served is not None, ext
    path = tmp_path / f"payload.{ext}"
    path.write_bytes(served[1])
    assert EXPECTED[ext] in file_type(path)


def test_extensions_are_case_insensitive():
    assert payloads.by_extension("PDF") == payloads.by_extension("pdf")


@pytest.mark.parametrize("ext, part", [("docx", "word/document.xml"), ("xlsx", "xl/workbook.xml"),
                                       ("jar", "META-INF/MANIFEST.MF"), ("apk", "AndroidManifest.xml")])
def test_packages_open_as_zips_with_their_main_part(ext, part):
    with zipfile.ZipFile(io.BytesIO(payloads.by_extension(ext)[1])) as z:
        assert z.testzip() is None
        assert part in z.namelist()


def test_the_pdf_cross_reference_points_at_its_objects():
    pdf = payloads.by_extension("pdf")[1]
    xref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n")[0])
    assert pdf[xref:].startswith(b"xref\n")
    offsets = [int(line[:10]) for line in pdf[xref:].split(b"\n")[3:6]]
    assert [pdf[o:o + 7] for o in offsets] == [b"1 0 obj", b"2 0 obj", b"3 0 obj"]
