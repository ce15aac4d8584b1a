"""The messages POP3 and IMAP serve: a directory's .eml files, or the welcome message."""

from __future__ import annotations

from nftdivert.services import inbox
from nftdivert.services.inbox import Message


def test_the_mailbox_directory_serves_its_eml_files_in_name_order_and_bytes_unchanged(tmp_path):
    (tmp_path / "b.eml").write_bytes(b"Subject: b\n\nbody \xe9\n")
    (tmp_path / "a.eml").write_bytes(b"Subject: a\r\n\r\nA\r\n")
    (tmp_path / "notes.txt").write_text("not mail")
    box = inbox.load(str(tmp_path), "mail.example.com")
    assert [m.text for m in box] == ["Subject: a\r\n\r\nA\r\n", "Subject: b\r\n\r\nbody \udce9\r\n"]
    assert box[1].size == len(b"Subject: b\r\n\r\nbody \xe9\r\n")
    (neutral,) = inbox.load(str(tmp_path / "missing"), "mail.example.com")
    assert "Subject: Welcome" in neutral.header and neutral.body


def test_top_gives_the_header_and_the_first_lines_of_the_body():
    message = Message("Subject: x\r\n\r\none\r\ntwo\r\n")
    assert inbox.top(message, 1) == "Subject: x\r\n\r\none\r\n"
    assert inbox.top(message, 0) == message.header == "Subject: x\r\n\r\n"
