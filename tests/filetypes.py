"""What `file(1)` says of each file served by extension (services/payloads.py)."""

from __future__ import annotations

import subprocess

# extension -> what `file -b` must say (its start, or a part of it)
EXPECTED = {
    "pdf": "PDF document",
    "jpg": "JPEG image data",
    "jpeg": "JPEG image data",
    "gif": "GIF image data",
    "ico": "MS Windows icon resource",
    "png": "PNG image data",
    "ps1": "pwsh script",
    "js": "JavaScript source",
    "bat": "DOS batch file",
    "sh": "POSIX shell script",
    "doc": "Microsoft Word",
    "xls": "Microsoft Excel",
    "msi": "MSI Installer",
    "docx": "Microsoft Word 2007+",
    "xlsx": "Microsoft Excel 2007+",
    "elf": "ELF 64-bit LSB executable, x86-64",
    "apk": "Android package (APK)",
    "jar": "Java archive data (JAR)",
    "exe": "PE32 executable",
    "dll": "PE32 executable (DLL)",
    "zip": "Zip archive data",
    # file(1) has no magic for VBScript: plain text is all it can say.
    "vbs": "ASCII text",
}


def file_type(path) -> str:
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout.strip()
