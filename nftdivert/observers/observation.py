"""The conversation log's part of `run`: conntrack accounting on, the observer
feeding the log, and the table of what was contacted when it stops."""
from __future__ import annotations

import sys
from contextlib import ExitStack
from typing import TextIO

from nftdivert.config import Config
from nftdivert.errors import ConfigError, NftDivertError, say
from nftdivert.observers import ctsettings
from nftdivert.observers.observer_process import ObserverProcess
from nftdivert.observers.convlog import ConversationLog


class Unobserved:
    """The observer's counters when nothing observes."""

    failed = lost = 0
    process = None

    @staticmethod
    def ends() -> dict:
        return {}


class Observation:
    """The conversation observer's part of a run: conntrack accounting on, the
    observer feeding the log, and the table of what was contacted at the end."""

    def __init__(self, summary_path: str | None, clients_netns: str | None) -> None:
        self.summary_path, self.clients_netns = summary_path, clients_netns
        self.summary_file: TextIO | None = None
        self.observer = None
        self.log: ConversationLog | None = None

    def open_summary(self, stack: ExitStack) -> None:
        if self.summary_path:  # opened first: a bad path is bad input, found before anything starts
            try:
                self.summary_file = stack.enter_context(open(self.summary_path, "w", encoding="utf-8"))
            except OSError as exc:
                raise ConfigError("--summary", self.summary_path, exc.strerror or str(exc)) from None

    def start(self, config: Config, stack: ExitStack, log: ConversationLog, name_for, hooks=None, profile_for=None,
              named=None):
        """Closed after the ruleset is gone (the stack unwinds in reverse) and before the log.
        `profile_for(client address, time)`: the [[profiles]] name that answers it then, or None;
        `named()`: where the addresses that stand for names lie now (ObserverProcess).

        With the log off and no summary file asked for, nothing watches
        conntrack: what it would cost is not spent for a record nobody keeps.
        """
        if config.worker.log == "" and not self.summary_path:
            say('conversation log off (--log ""): nothing watches conntrack, and no table of what '
                "was contacted is printed at the end")
            return Unobserved()
        try:
            emit = log.put if hooks is None else hooks.watching(log.put)  # [hooks]: on each first start
            self.observer = ObserverProcess(config, emit, name_for, self.clients_netns, task_for=log.tasks,
                                            profile_for=profile_for, named=named)
            self.log = log
        except OSError as exc:
            raise NftDivertError(str(exc)) from None
        stack.callback(self.report)  # once the observer has closed: every conversation has its end
        stack.callback(self.observer.close)
        stack.enter_context(ctsettings.accounting())  # after the event socket: it loads conntrack
        return self.observer

    def report(self) -> None:
        if self.observer is None:
            return
        if self.log is not None:  # the end records first: the table comes last
            self.log.drain()
        print(self.observer.summary.table(), file=sys.stderr, end="", flush=True)
        if self.summary_file is not None:
            try:
                self.summary_file.write(self.observer.summary.as_json())
                self.summary_file.flush()
            except OSError as exc:
                say(f"cannot write the summary {self.summary_path}: {exc.strerror or exc}")
