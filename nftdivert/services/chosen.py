"""The answers in effect in a run: the config's profiles, and the ones analyses (tasks) chose.

A task that chose a profile gives its clients that profile's answers while
it runs. The analyses' table is in the run's process; the listeners choose
in processes of their own, per conversation and per question, so each new
table goes to them (ListenerProcess.choose) and each takes it before the
task's start or end is answered. The profiles' ports left alone follow
too: the table's `client . port` sets are filled anew (client_sets.py).
"""

from __future__ import annotations

import threading
import time

from nftdivert.config import Config
from nftdivert.errors import ConfigError, KernelError, say
from nftdivert.profiles import Profiles
from nftdivert.ruleset import client_sets
from nftdivert.ruleset.kernel import Nft
from nftdivert.tasks import TaskTable


class Answers:
    """`profiles`: the profiles in effect, with the tasks' choices (the observer and the hooks ask it)."""

    def __init__(self, config: Config, listeners) -> None:
        self._table_name, self._listeners = config.table, listeners
        self._config = config
        self._tasks = TaskTable()
        self.profiles = Profiles(config)
        # The run's DNS pools, every profile's: the listeners keep each (with its names) for the run.
        self._pools = tuple(config.dns_pools())
        # A reload (a signal handler in the main thread, which may hold it already) and the analyses' thread.
        self._lock = threading.RLock()
        self._sets = False  # the table's sets exist: the ruleset is in, and not yet on its way out
        self._filled: client_sets.Chosen = ()  # the tasks' choices the sets hold
        self._sent = TaskTable()  # what the listeners hold

    def tasks_changed(self, table: TaskTable) -> None:
        """The analyses' new table: the tasks' choices to the listeners and into the sets, at once."""
        with self._lock:
            # The whole table: a late record's profile is its conversation's start's. Without a choice
            # in it, none: the observer's lookup per record stays as cheap as without tasks.
            self._tasks = table if any(iv.profile for iv in table.intervals) else TaskTable()
            self.profiles.chosen = self._tasks
            now = time.time()
            choosing = table.choosing(now)
            if choosing != self._sent:
                self._sent = choosing
                if not self._listeners.choose(choosing):
                    say("a listener process did not take the tasks' profiles in time: it may answer "
                        "their clients by their addresses for a while")
            chosen = table.chosen(now)
            if self._sets and chosen != self._filled:
                try:
                    self._fill(self._config, chosen)
                except (KernelError, OSError) as exc:
                    say(f"could not fill the ports the profiles leave alone for the tasks' clients: {exc}")

    def reloaded(self, config: Config) -> None:
        """A reload's profiles, with the tasks' choices kept; ConfigError or KernelError (and nothing
        changed) if it takes away a profile a running task chose, or the sets cannot be filled."""
        with self._lock:
            names = {p.name for p in config.profiles}
            for task, name in self._tasks.profiles(time.time()).items():
                if name not in names:
                    raise ConfigError("profiles", name, f"task {task} runs with this profile: end it first")
            profiles = Profiles(config)
            profiles.chosen = self._tasks
            # A profile gone with its pool: the addresses it gave still name their names.
            profiles.named = tuple(dict.fromkeys((*profiles.named, *self._pools)))
            if self._sets:
                self._fill(config, self._filled)
            self._config, self.profiles = config, profiles

    def ruleset_in(self) -> None:
        """The ruleset is in (with the config's sets): the tasks' choices into them too."""
        with self._lock:
            self._sets = True
            chosen = self._tasks.chosen(time.time())
            if chosen:
                self._fill(self._config, chosen)

    def ruleset_out(self) -> None:
        """The ruleset goes: the sets are no longer filled."""
        with self._lock:
            self._sets = False

    def _fill(self, config: Config, chosen: client_sets.Chosen) -> None:
        """One transaction; a context of its own (a signal may interrupt the loop's use of its own)."""
        Nft().run(client_sets.set_commands(self._table_name, config, chosen), source="profiles")
        self._filled = chosen
