"""One analysis's evidence: a directory of its own, written while it runs, summarized when it ends.

    DIRECTORY/TASK/conversations.jsonl   its records only (JSON Lines, the log's schema)
    DIRECTORY/TASK/capture.pcap          its clients' packets only (when the run captures, -w)
    DIRECTORY/TASK/files/                what its conversations handed over: bodies, mail, uploads
    DIRECTORY/TASK/summary.txt, .json    the table of what was contacted, as `run` prints it at its end
    DIRECTORY/TASK/report.html           `nftdivert report` of its log

The log's writer thread hands each record of the task here, in the log's
order. A saved file is linked (or copied, across file systems) into files/
as the record is written, and the record in the task's own log names that
copy: the saved files are named by their sha256 and shared by every task, so
the task's directory keeps its own whatever comes later.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nftdivert.errors import ConfigError, say
from nftdivert.observers.convrecords import (
    conversation_key, end_record, event_key, synthesized_end, with_task)
from nftdivert.observers.summary import Summary

LOG, PCAP, FILES = "conversations.jsonl", "capture.pcap", "files"
SAVED_FIELDS = ("saved", "body_saved")  # the records' paths of what was kept (log-schema.md)
OPEN_KEPT = 65536  # conversations of the task without an end yet, remembered to end them at its end


def directory(base: str, task: str) -> Path:
    return Path(base) / task


def create(base: str, task: str) -> Path:
    """The task's directory, new: one left by an earlier run is not mixed into (ConfigError)."""
    path = directory(base, task)
    try:
        os.makedirs(base, mode=0o750, exist_ok=True)
        path.mkdir(mode=0o750)
    except FileExistsError:
        raise ConfigError("TASK", task, f"its evidence directory {path} exists already (an earlier run's?)") from None
    except OSError as exc:
        raise ConfigError("analyses.directory", base, exc.strerror or str(exc)) from None
    return path


class Evidence:
    """The task's log, its copies of saved files and its summary, until finish()."""

    def __init__(self, task: str, path: Path) -> None:
        self.task, self.path = task, path
        self.summary = Summary()
        self.records = self.failed = 0
        self.open: dict[tuple, dict] = {}  # conversation_key -> its start, until its end is written
        self._files = path / FILES
        self._log = open(path / LOG, "w", encoding="utf-8")  # noqa: SIM115 - closed by finish()

    def write(self, rec: dict) -> None:
        """In the log's writer thread: one record of this task."""
        if self._log.closed:
            return
        rec = self._keep_files(rec)
        try:
            self._log.write(json.dumps(rec) + "\n")
            self._log.flush()
        except (OSError, ValueError, TypeError) as exc:
            self.failed += 1
            if self.failed == 1:
                say(f"task {self.task}: cannot write {self.path / LOG}: {getattr(exc, 'strerror', None) or exc}")
            return
        self.records += 1
        self.summary.add(rec)
        if rec.get("event") == "start":
            self.open[conversation_key(rec)] = rec
            if len(self.open) > OPEN_KEPT:  # a flood whose ends never come: the oldest goes without one
                del self.open[next(iter(self.open))]
        elif rec.get("event") == "end":
            self.open.pop(conversation_key(rec), None)

    def end_open(self, live: list | None, now: float) -> None:
        """At the task's end: each conversation still open gets its `end` here (its own comes to
        the run's log later), from conntrack's `live` entry (`open`, counters so far), or
        `unknown` where conntrack has none (None: it could not be asked)."""
        entries = {event_key(ev): ev for ev in live or ()}
        for key, start in list(self.open.items()):
            ev = entries.get(key)
            end = end_record(ev, now, start) if ev is not None else synthesized_end(start, now)
            self.write(with_task(end, self.task))

    def _keep_files(self, rec: dict) -> dict:
        kept = {}
        for key in SAVED_FIELDS:
            saved = rec.get(key)
            if not isinstance(saved, str) or not saved.startswith("/"):
                continue
            copy = self._files / os.path.basename(saved)
            try:
                self._files.mkdir(mode=0o700, exist_ok=True)
                if not copy.exists():
                    try:
                        os.link(saved, copy)
                    except OSError:  # another file system, or no hard links there
                        shutil.copyfile(saved, copy)
                kept[key] = str(copy.resolve())
            except OSError as exc:
                say(f"task {self.task}: cannot keep {saved} in {self._files}: {exc.strerror or exc}")
        return {**rec, **kept} if kept else rec

    def finish(self) -> list[str]:
        """Close the log; write the summary (text and JSON) and the report. What it wrote, by name."""
        from nftdivert.report import page

        self._log.close()
        made = [LOG]
        try:
            (self.path / "summary.txt").write_text(self.summary.table(), encoding="utf-8")
            (self.path / "summary.json").write_text(self.summary.as_json(), encoding="utf-8")
            made += ["summary.txt", "summary.json"]
            page.write(str(self.path / LOG), str(self.path / "report.html"))
            made.append("report.html")
        except (OSError, ConfigError) as exc:
            say(f"task {self.task}: cannot finish its evidence in {self.path}: {getattr(exc, 'strerror', None) or exc}")
        return made
