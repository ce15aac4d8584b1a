"""The answers in effect in a run: the tasks' choices to the listeners, a reload that keeps them
(the sets' side is the e2e test's: test_e2e_profiles)."""
from __future__ import annotations

import ipaddress
import time
from dataclasses import replace

import pytest

from nftdivert.config import Config, HttpConfig, Profile
from nftdivert.errors import ConfigError
from nftdivert.services.chosen import Answers
from nftdivert.tasks import TaskTable


class Listeners:
    """What the listener processes were told (ListenerProcess.choose's side of it)."""

    def __init__(self) -> None:
        self.told: list[TaskTable] = []

    def choose(self, tasks: TaskTable) -> bool:
        self.told.append(tasks)
        return True


SINKHOLE = replace(Config(), profiles=(Profile("sinkhole", http=HttpConfig(body="sinkholed")),
                                       Profile("lab", (ipaddress.ip_network("192.0.2.0/24"),))))


def test_the_tasks_choices_reach_the_listeners_once_each_and_a_reload_keeps_them():
    listeners = Listeners()
    answers = Answers(SINKHOLE, listeners)
    now = time.time()
    plain = TaskTable().started("t0", (ipaddress.ip_network("192.0.2.9/32"),), now)
    answers.tasks_changed(plain)
    assert listeners.told == [] and answers.profiles.chosen == TaskTable()  # nothing chosen: nothing to say
    chose = plain.started("t1", (ipaddress.ip_network("192.0.2.10/32"),), now, profile="sinkhole")
    answers.tasks_changed(chose)
    answers.tasks_changed(chose)  # the same again (a prune, a due end of another task): not sent again
    assert listeners.told == [chose.choosing(now)]
    assert answers.profiles.profile_for("192.0.2.10").profile == "sinkhole"
    assert answers.profiles.profile_for("192.0.2.9").profile == "lab"

    with pytest.raises(ConfigError) as info:
        answers.reloaded(replace(SINKHOLE, profiles=SINKHOLE.profiles[1:]))
    assert str(info.value) == "profiles = 'sinkhole': task t1 runs with this profile: end it first", str(info.value)
    assert answers.profiles.profile_for("192.0.2.10").http.body == "sinkholed"  # nothing changed
    renewed = replace(SINKHOLE, profiles=(Profile("sinkhole", http=HttpConfig(body="v2")), SINKHOLE.profiles[1]))
    answers.reloaded(renewed)
    assert answers.profiles.profile_for("192.0.2.10").http.body == "v2"  # the new profile, still chosen
    answers.tasks_changed(chose.ended("t1", time.time()))
    assert listeners.told[-1] == TaskTable()
    assert answers.profiles.profile_for("192.0.2.10", time.time() + 1).profile == "lab"
    assert answers.profiles.profile_for("192.0.2.10", now).profile == "sinkhole"  # a late record of its start


def test_a_reload_that_drops_a_profiles_pool_still_names_its_addresses():
    from nftdivert.config import DnsConfig

    own = Profile("own", (ipaddress.ip_network("192.0.2.0/24"),),
                  dns=DnsConfig(answer_v4="198.19.0.0/16", answer_v6="2001:db8:a::/64"))
    running = replace(Config(), dns=DnsConfig(answer_v4="198.18.0.0/16"), profiles=(own,))
    answers = Answers(running, Listeners())
    assert ipaddress.ip_network("198.19.0.0/16") in answers.profiles.named
    answers.reloaded(replace(running, profiles=()))
    assert {str(net) for net in answers.profiles.named} == {"198.18.0.0/16", "2001:db8:53::/64",
                                                            "198.19.0.0/16", "2001:db8:a::/64"}
