"""Preemption across hosts through the real entry point (benchmarks/relaunch.py, with a 10 s
stale window instead of the default 60 s): each host is a process with its own hostname
(``unshare -u``, root), all sharing one workdir.

- A run killed with -9 on vm1 and relaunched at once on vm2 finishes with no manual step, within
  150 s of an uninterrupted run's time, bitwise equal to it.
- A run frozen (SIGSTOP) on vm1 while vm3 takes over and finishes stops at once when thawed,
  with one line and a non-zero status, writing nothing; vm3's final state is bitwise the
  uninterrupted run's.
"""

import pytest

from benchmarks import relaunch

pytestmark = [pytest.mark.skipif(not relaunch.can_simulate_hosts(),
                                 reason="`unshare -u` (a hostname per process) needs root"),
              pytest.mark.slow]  # ~90 s: runs on two simulated hosts, a freeze, a relaunch


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return relaunch.run_all(tmp_path_factory.mktemp("relaunch"), stale_after=10.0)


def test_a_run_killed_on_one_host_and_relaunched_on_another_finishes_by_itself(results):
    vanished = results["vanished"]
    assert vanished["relaunch_exit"] == 0, vanished["error"]
    assert vanished["took_over"] and vanished["resumed_from"] > 0
    assert vanished["seconds"] <= (results["uninterrupted"]["seconds"]
                                   + relaunch.TARGET_EXTRA_SECONDS), results
    assert vanished["bitwise_equal"]


def test_a_frozen_holder_stops_without_writing_once_its_successor_took_over(results):
    partitioned = results["partitioned"]
    assert partitioned["successor_exit"] == 0 and partitioned["successor_took_over"]
    assert partitioned["bitwise_equal"]
    assert partitioned["holder_exit"] == 1, partitioned
    assert partitioned["holder_stopped_after_seconds"] < relaunch.FENCE_SECONDS
    assert partitioned["holder_line"].startswith("error: LeaseLostError: the lease of ")
    assert partitioned["written_after_thaw"] == []
