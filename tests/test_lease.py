"""The workdir lease, on a local directory and on gs:// (a Cloud Storage API server:
tests/gcs_server.py): a relaunch takes over from a vanished holder within one stale window, a
live holder is named, racing starts have one winner, and a holder that lost its lease stops
without writing (fencing)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from byol_flax.checkpointing import lease
from tests.gcs_server import GcsServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs_emulator():
    """A GCS JSON API server on localhost (with GCS's generation preconditions);
    ``STORAGE_EMULATOR_HOST`` points clients, and the holder processes these tests start, at it."""
    with GcsServer() as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", server.emulator_host)
        yield server


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
    """A fresh workdir: a local directory, or a prefix in the server's bucket."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("gcs_emulator")
    return f"gs://bucket/{uuid.uuid4().hex}"


def read_record(workdir):
    text, _ = lease._store(lease.epath.Path(workdir) / lease.LEASE_NAME).read()
    return None if text is None else json.loads(text)


def write_record(workdir, record):
    """Another run's record in place of the lease, as a compare-and-swap: a live holder's
    heartbeat between the read and the swap (every 0.2 s in some tests) makes it read again."""
    store = lease._store(lease.epath.Path(workdir) / lease.LEASE_NAME)
    for _ in range(20):
        try:
            store.swap(store.read()[1], json.dumps(record))
            return
        except lease._Changed:
            continue
    raise AssertionError(f"the lease of {workdir} changed under 20 swaps in a row")


def another_host(**changes):
    return {"host": "vm-elsewhere", "pid": 1, "token": "theirs", "started": "earlier",
            "heartbeat": time.time(), **changes}


def test_a_free_workdir_is_taken_and_released(workdir):
    with lease.WorkdirLease(workdir, stale_after_seconds=5) as held:
        assert read_record(workdir)["token"] == held.token
        assert held.held()
    assert read_record(workdir) is None


def test_a_live_holder_on_this_host_is_named_at_once(workdir):
    with lease.WorkdirLease(workdir, stale_after_seconds=60):
        started = time.monotonic()
        with pytest.raises(lease.WorkdirBusyError) as caught:
            lease.WorkdirLease(workdir, stale_after_seconds=60).acquire()
        assert time.monotonic() - started < 5
        assert f"process {os.getpid()} on host {socket.gethostname()}" in str(caught.value)
    lease.WorkdirLease(workdir, stale_after_seconds=60).acquire().release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(workdir):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    write_record(workdir, another_host(host=socket.gethostname(), pid=int(finished.stdout)))
    started = time.monotonic()
    held = lease.WorkdirLease(workdir, stale_after_seconds=60).acquire()
    assert time.monotonic() - started < 5
    assert read_record(workdir)["token"] == held.token
    held.release()


def test_a_silent_holder_on_another_host_is_taken_over_after_one_stale_window(workdir):
    """A preempted VM leaves a fresh lease: the relaunch waits one window, then trains."""
    write_record(workdir, another_host())
    started = time.monotonic()
    held = lease.WorkdirLease(workdir, stale_after_seconds=2, heartbeat_seconds=0.2).acquire()
    waited = time.monotonic() - started
    assert 2 <= waited < 5, waited
    assert read_record(workdir)["token"] == held.token
    held.release()


def test_a_lease_older_than_the_window_is_taken_over_without_waiting(workdir):
    write_record(workdir, another_host(heartbeat=time.time() - 120))
    started = time.monotonic()
    lease.WorkdirLease(workdir, stale_after_seconds=60).acquire().release()
    assert time.monotonic() - started < 5


def test_a_beating_holder_on_another_host_is_named_within_a_heartbeat(workdir):
    stop = threading.Event()

    def beat():
        while not stop.wait(0.2):
            write_record(workdir, another_host())

    write_record(workdir, another_host())
    beating = threading.Thread(target=beat)
    beating.start()
    try:
        started = time.monotonic()
        with pytest.raises(lease.WorkdirBusyError, match="process 1 on host vm-elsewhere"):
            lease.WorkdirLease(workdir, stale_after_seconds=10, heartbeat_seconds=0.2).acquire()
        assert time.monotonic() - started < 3
    finally:
        stop.set()
        beating.join()


def test_of_starts_racing_for_a_stale_lease_exactly_one_wins(workdir):
    write_record(workdir, another_host(heartbeat=time.time() - 120))
    outcomes, barrier = [], threading.Barrier(4)

    def start():
        candidate = lease.WorkdirLease(workdir, stale_after_seconds=60)
        barrier.wait()
        try:
            outcomes.append(candidate.acquire())
        except lease.WorkdirBusyError as error:
            outcomes.append(error)

    racers = [threading.Thread(target=start) for _ in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    winners = [o for o in outcomes if isinstance(o, lease.WorkdirLease)]
    assert len(winners) == 1 and len(outcomes) == 4
    assert read_record(workdir)["token"] == winners[0].token
    winners[0]._stop.set()  # the racers share a process: stop the heartbeat, keep no fence
    lease._ACTIVE.lease = None


HOLDER = textwrap.dedent("""
    import pathlib, sys, time
    from byol_flax.checkpointing import lease
    workdir, marker, heartbeat = sys.argv[1], sys.argv[2], float(sys.argv[3])
    held = lease.WorkdirLease(workdir, stale_after_seconds=60, heartbeat_seconds=heartbeat)
    held.acquire()
    pathlib.Path(marker).write_text(held.token)
    for n in range(600):  # a run's writes, each behind the fence
        time.sleep(0.05)
        lease.fence()
        pathlib.Path(marker + ".writes").write_text(str(n))
""")


@pytest.mark.parametrize("heartbeat", [0.2, 600.0], ids=["by-the-heartbeat", "by-the-fence"])
def test_a_holder_whose_lease_was_taken_stops_at_once_without_writing(workdir, tmp_path,
                                                                      heartbeat):
    """Taken over while it was silent (a partitioned or frozen VM): the holder's next beat, or
    the fence before its next write, stops it with one line and a non-zero status."""
    marker = tmp_path / "holder"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir, str(marker),
                               str(heartbeat)], cwd=REPO, env=os.environ.copy(),
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and (tmp_path / "holder.writes").exists()):
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()
            time.sleep(0.05)
        write_record(workdir, another_host(token="new-holder"))
        taken = time.monotonic()
        assert holder.wait(timeout=30) == lease.LOST_EXIT_STATUS
        assert time.monotonic() - taken < 5
        last = (tmp_path / "holder.writes").read_text()
        error = holder.stderr.read().strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: LeaseLostError:")
        assert "process 1 on host vm-elsewhere" in error[0]
        time.sleep(0.3)
        assert (tmp_path / "holder.writes").read_text() == last
        assert read_record(workdir)["token"] == "new-holder"  # the new holder's lease stays
    finally:
        holder.kill()
        holder.wait()
