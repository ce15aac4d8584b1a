"""The analyses' interval table: which task owns a client at time t (pure)."""
from __future__ import annotations

import ipaddress

import pytest

from nftdivert import tasks
from nftdivert.errors import ConfigError

A, B = "10.0.1.23", "10.0.1.24"


def nets(*values: str):
    return tuple(ipaddress.ip_network(v) for v in values)


def test_an_address_belongs_to_its_task_from_start_to_end_only():
    table = tasks.TaskTable().started("4711", nets(A), 100.0).ended("4711", 200.0)
    assert table.owner(A, 99.999) is None
    assert table.owner(A, 100.0) == "4711"
    assert table.owner(A, 199.999) == "4711"
    assert table.owner(A, 200.0) is None
    assert table.owner(B, 150.0) is None


def test_a_reused_address_goes_to_the_later_task():
    table = tasks.TaskTable().started("first", nets(A), 100.0).ended("first", 200.0).started("second", nets(A), 300.0)
    assert table.owner(A, 150.0) == "first"  # a late record of the first task's time
    assert table.owner(A, 250.0) is None
    assert table.owner(A, 350.0) == "second"


def test_overlapping_tasks_the_later_start_wins_then_the_longer_prefix():
    table = tasks.TaskTable().started("lab", nets("10.0.1.0/24"), 100.0).started("vm", nets(A), 200.0)
    assert table.owner(A, 150.0) == "lab"
    assert table.owner(A, 250.0) == "vm"  # the earlier task was never ended: the later one wins
    assert table.owner(B, 250.0) == "lab"
    both = tasks.TaskTable().started("wide", nets("10.0.0.0/8"), 100.0).started("narrow", nets("10.0.1.0/24"), 100.0)
    assert both.owner(A, 100.0) == "narrow"


def test_families_and_forms_of_an_address():
    table = tasks.TaskTable().started("t", nets("2001:db8:1::/64", "192.0.2.0/24"), 1.0)
    assert table.owner("2001:db8:1::7", 2.0) == "t"
    assert table.owner(ipaddress.ip_address("192.0.2.9").packed, 2.0) == "t"
    assert table.owner("::ffff:192.0.2.9", 2.0) is None  # another family, not a match by accident
    assert table.owner("2001:db8:2::7", 2.0) is None


def test_duplicate_and_unknown_tasks_are_refused():
    table = tasks.TaskTable().started("t", nets(A), 1.0)
    with pytest.raises(ConfigError, match="duplicate"):
        table.started("t", nets(B), 2.0)
    with pytest.raises(ConfigError, match="unknown"):
        table.ended("other", 2.0)
    ended = table.ended("t", 3.0)
    with pytest.raises(ConfigError, match="unknown"):
        ended.ended("t", 4.0)
    with pytest.raises(ConfigError, match="duplicate"):  # an ended id is not started again in this run
        ended.started("t", nets(A), 5.0)


def test_an_end_never_comes_before_the_start():
    table = tasks.TaskTable().started("t", nets(A), 100.0).ended("t", 50.0)  # a clock that stepped back
    assert table.intervals[0].end == 100.0
    assert table.owner(A, 100.0) is None and not table.running("t", 100.0)


def test_pruned_keeps_running_and_recent_tasks():
    table = (tasks.TaskTable().started("old", nets(A), 1.0).ended("old", 2.0)
             .started("recent", nets(A), 3.0).ended("recent", 10.0).started("now", nets(B), 11.0))
    kept = table.pruned(5.0)
    assert [iv.task for iv in kept.intervals] == ["recent", "now"]
    with pytest.raises(ConfigError, match="duplicate"):  # a pruned id stays taken
        kept.started("old", nets(A), 20.0)
    assert tasks.reconciled(kept, (spec("old", A),), 20.0)[1] == []


@pytest.mark.parametrize("value", ["", "a/b", ".hidden", "x" * 65, "tab\tbed", 4711, None])
def test_task_ids_that_are_refused(value):
    with pytest.raises(ConfigError, match="task id"):
        tasks.check_task(value)


@pytest.mark.parametrize("value", ["10.0.1.23/24", "not-an-address", "fe80::1%eth0", 7])
def test_clients_that_are_refused(value):
    with pytest.raises(ConfigError):
        tasks.client_network(value)


def test_the_file_parsed_in_toml_and_json():
    toml = '[[task]]\nid = "a"\nclients = ["10.0.1.23"]\nend = 2026-12-06T10:07:00Z\n' \
           '[[task]]\nid = "b"\nclients = ["10.0.2.0/28", "2001:db8:1::/64"]\n'
    specs = tasks.parse_file(toml, json_format=False)
    assert [(s.task, s.end) for s in specs] == [("a", 1796551620.0), ("b", None)]
    same = tasks.parse_file('{"task": [{"id": "a", "clients": ["10.0.1.23"], "end": "2026-12-06T10:07:00Z"}]}', True)
    assert same[0] == specs[0]


@pytest.mark.parametrize("text, words", [
    ('[[task]]\nid = "a"\n', "id, clients"),
    ('[[task]]\nid = "a"\nclients = []\n', "at least one"),
    ('[[task]]\nid = "a"\nclients = ["10.0.1.1"]\n[[task]]\nid = "a"\nclients = ["10.0.1.2"]\n', "listed twice"),
    ('[[task]]\nid = "a"\nclients = ["10.0.1.1"]\nend = "tomorrow"\n', "RFC 3339"),
    ('[[task]]\nid = "a"\nclients = ["10.0.1.1"]\nend = 2026-12-06T10:07:00\n', "offset"),
    ('tasks = 1\n', 'only a list "task"'),
    ('[[task]\n', "not valid TOML"),
])
def test_bad_files_say_what_is_wrong(text, words):
    with pytest.raises(ConfigError, match="analyses.file") as info:
        tasks.parse_file(text, json_format=False)
    assert words in str(info.value)


def spec(task: str, *clients: str, end: float | None = None) -> tasks.TaskSpec:
    return tasks.TaskSpec(task, nets(*clients), end)


def test_the_file_starts_new_tasks_and_ends_the_ones_it_no_longer_lists():
    table, started, ended = tasks.reconciled(tasks.TaskTable(), (spec("a", A), spec("b", B)), 10.0)
    assert (started, ended) == (["a", "b"], [])
    table, started, ended = tasks.reconciled(table, (spec("b", B),), 20.0)
    assert (started, ended) == ([], ["a"])
    assert table.owner(A, 15.0) == "a" and table.owner(A, 25.0) is None and table.owner(B, 25.0) == "b"
    # Listed again later: an id this run has had is not started twice.
    table, started, ended = tasks.reconciled(table, (spec("a", A), spec("b", B)), 30.0)
    assert (started, ended) == ([], [])


def test_the_file_leaves_the_commands_tasks_alone_and_follows_its_ends():
    table = tasks.TaskTable().started("cmd", nets(A), 1.0)
    table, started, ended = tasks.reconciled(table, (spec("f", B, end=50.0), spec("gone", B, end=5.0)), 10.0)
    assert (started, ended) == (["f"], [])  # one whose end has passed is not started
    assert table.running("cmd", 10.0)
    assert table.owner(B, 49.0) == "f" and table.owner(B, 50.0) is None
    assert table.due_ends(10.0, 50.0) == ["f"] and table.due_ends(50.0, 60.0) == []
    table, _, _ = tasks.reconciled(table, (spec("f", B, end=2.0),), 20.0)  # an end in the past: now
    assert table.owner(B, 19.0) == "f" and table.owner(B, 20.0) is None


def test_the_intervals_holding_an_address_answer_as_the_whole_table():
    table = (tasks.TaskTable().started("lab", nets("10.0.1.0/24"), 1.0).started("vm", nets(A), 5.0)
             .ended("vm", 9.0).started("other", nets(B), 2.0))
    held = table.holding(ipaddress.ip_address(A).packed)
    assert sorted(iv.task for iv in held.intervals) == ["lab", "vm"]
    for when in (0.5, 1.0, 4.9, 5.0, 8.9, 9.0, 20.0):
        assert held.owner(A, when) == table.owner(A, when)


def test_a_task_may_choose_a_profile_which_wins_while_it_owns_the_client():
    a = ipaddress.ip_address(A)
    table = (tasks.TaskTable().started("lab", nets("10.0.1.0/24"), 1.0, profile="sinkhole")
             .started("vm", nets(A), 5.0).ended("vm", 9.0))
    assert table.profile_of(a, 2.0) == "sinkhole"
    assert table.profile_of(a, 6.0) is None  # the later task chose none: the address's profile, not the earlier's
    assert table.profile_of(a, 9.0) == "sinkhole" and table.profile_of(a, 0.5) is None
    assert table.profiles(6.0) == {"lab": "sinkhole"}
    # What the listeners get: the open intervals, only while one of them chose a profile.
    assert [iv.task for iv in table.choosing(6.0).intervals] == ["lab", "vm"]
    assert table.chosen(6.0) == ((nets(A)[0], None), (nets("10.0.1.0/24")[0], "sinkhole"))  # the winner first
    assert table.ended("lab", 10.0).choosing(11.0) == tasks.TaskTable()
    assert tasks.TaskTable().started("plain", nets(A), 1.0).choosing(2.0) == tasks.TaskTable()


def test_a_profile_must_be_one_the_run_has():
    assert tasks.check_profile("sinkhole", {"sinkhole", "c2"}) == "sinkhole"
    for value, known in (("nosuch", {"sinkhole", "c2"}), (7, {"sinkhole"}), ("sinkhole", frozenset())):
        with pytest.raises(ConfigError) as info:
            tasks.check_profile(value, known)
        assert str(info.value).startswith("--profile = ") and "no [[profiles]] of that name" in str(info.value)
    with pytest.raises(ConfigError, match="it has: none"):
        tasks.check_profile("sinkhole", ())


def test_the_file_gives_a_tasks_profile_and_refuses_one_the_run_has_not():
    toml = '[[task]]\nid = "a"\nclients = ["10.0.1.23"]\nprofile = "sinkhole"\n[[task]]\nid = "b"\nclients = ["10.0.1.24"]\n'
    specs = tasks.parse_file(toml, json_format=False, profiles={"sinkhole"})
    assert [(s.task, s.profile) for s in specs] == [("a", "sinkhole"), ("b", None)]
    assert tasks.parse_file('{"task": [{"id": "a", "clients": ["10.0.1.23"], "profile": "sinkhole"}]}', True,
                            profiles={"sinkhole"})[0] == specs[0]
    with pytest.raises(ConfigError) as info:
        tasks.parse_file(toml, json_format=False, profiles={"c2"})
    assert str(info.value).startswith("analyses.file task[0].profile = 'sinkhole': no [[profiles]]"), str(info.value)
    with pytest.raises(ConfigError, match=r"task\[0\].profile"):
        tasks.parse_file('[[task]]\nid = "a"\nclients = ["10.0.1.23"]\nprofile = 3\n', False, profiles={"sinkhole"})
    table, started, _ = tasks.reconciled(tasks.TaskTable(), specs, 10.0)
    assert started == ["a", "b"] and table.profiles(10.0) == {"a": "sinkhole"}
    # Listed again with another profile: a running task keeps the one it started with.
    again = (tasks.TaskSpec("a", nets(A), None, "c2"), specs[1])
    assert tasks.reconciled(table, again, 20.0)[0].profiles(20.0) == {"a": "sinkhole"}
