"""Mail and uploads kept by their sha256."""

from __future__ import annotations

import hashlib

from nftdivert.services.mailstore import keep


def test_data_is_saved_under_its_sha256(tmp_path):
    info = keep(str(tmp_path / "mail"), b"hello", ".eml")
    digest = hashlib.sha256(b"hello").hexdigest()
    assert info == {"size": 5, "sha256": digest, "saved": str(tmp_path / "mail" / f"{digest}.eml")}
    assert (tmp_path / "mail" / f"{digest}.eml").read_bytes() == b"hello"
    assert (tmp_path / "mail").stat().st_mode & 0o777 == 0o700


def test_no_directory_logs_only_and_an_unusable_one_says_why(tmp_path):
    assert "saved" not in keep("", b"x")
    (tmp_path / "file").write_text("")
    info = keep(str(tmp_path / "file" / "sub"), b"x")
    assert "saved" not in info and info["save_error"].startswith(str(tmp_path / "file" / "sub"))
