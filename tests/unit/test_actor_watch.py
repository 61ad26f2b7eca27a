"""The driver's watch over model actors: crashes are counted, lost nodes are not, and a run
whose lost actors find no room waits a stated time without progress, then fails saying so."""

from sdray.batch.actors import ActorWatch


def actor(state="ALIVE", restarts=0, node="n1", actor_id="a1"):
    return {"id": actor_id, "state": state, "restarts": restarts, "node": node}


def nothing_committed() -> int:
    return 0


def test_node_losses_are_not_crashes_however_many():
    watch = ActorWatch(max_crashes=1, wait_s=60)
    watch.observe([actor(node="n1")], {"n1", "n2"}, 0, nothing_committed)
    for i in range(1, 6):  # its node lost five times over, restarted on a new one each time
        restarting = actor("RESTARTING", restarts=i, node=None)
        watch.observe([restarting], {f"n{i + 1}"}, i, nothing_committed)
        watch.observe(
            [actor(restarts=i, node=f"n{i + 1}")], {f"n{i + 1}"}, i + 0.5, nothing_committed
        )
    record = watch.records["a1"]
    assert (record.node_losses, record.crashes) == (5, 0)
    assert watch.failure is None


def test_crashes_on_a_live_node_count_until_the_budget_is_passed():
    watch = ActorWatch(max_crashes=2, wait_s=60)
    watch.observe([actor()], {"n1"}, 0, nothing_committed)
    watch.observe([actor(restarts=2)], {"n1"}, 1, nothing_committed)  # two crashes, one look
    assert watch.records["a1"].crashes == 2 and watch.failure is None
    watch.observe([actor(restarts=3)], {"n1"}, 2, nothing_committed)
    assert watch.failure is not None
    assert "crashed 3 times (batch.max_actor_restarts=2)" in str(watch.failure)
    assert "--resume" in str(watch.failure)


def test_each_actor_has_its_own_crash_count():
    watch = ActorWatch(max_crashes=1, wait_s=60)
    watch.observe([actor(actor_id="a"), actor(actor_id="b")], {"n1"}, 0, nothing_committed)
    both = [actor(actor_id="a", restarts=1), actor(actor_id="b", restarts=1)]
    watch.observe(both, {"n1"}, 1, nothing_committed)
    assert watch.failure is None


def test_every_actor_lost_waits_the_stated_time_then_fails():
    watch = ActorWatch(max_crashes=3, wait_s=30)
    starting = [actor("PENDING_CREATION", node=None)]
    watch.observe(starting, set(), 0, nothing_committed)
    watch.observe(starting, set(), 1000, nothing_committed)
    assert watch.failure is None, "before any actor lived, waiting for room is Ray Data's part"
    watch.observe([actor()], {"n1"}, 1001, nothing_committed)
    lost = [actor("RESTARTING", restarts=1, node=None)]
    watch.observe(lost, set(), 1002, nothing_committed)
    watch.observe(lost, set(), 1031, nothing_committed)
    assert watch.failure is None, "within actor_wait_s"
    watch.observe([actor(restarts=1, node="n9")], {"n9"}, 1032, nothing_committed)  # in time
    lost = [actor("RESTARTING", restarts=2, node=None)]
    watch.observe(lost, set(), 1040, nothing_committed)
    watch.observe(lost, set(), 1071, nothing_committed)
    assert watch.failure is not None
    message = str(watch.failure)
    assert "no model actor has been alive for 30s (batch.actor_wait_s)" in message
    assert "2 actor restarts after a node loss" in message and "--resume" in message
    assert watch.records["a1"].crashes == 0


def test_an_actor_with_no_room_waits_while_others_commit_then_fails():
    """One of two actors lost with its node and nowhere to restart: the other goes on
    committing shards (no failure, however long); once it stops, the wait is bounded."""
    watch = ActorWatch(max_crashes=3, wait_s=30, progress_every=5)
    shards = iter(range(1, 1000))
    progress = {"count": 0}

    def committed() -> int:
        return progress["count"]

    live, lost = actor(actor_id="a", node="n1"), actor(actor_id="b", node="n2")
    watch.observe([live, lost], {"n1", "n2"}, 0, committed)
    stranded = actor("RESTARTING", restarts=1, node=None, actor_id="b")
    for now in range(1, 200, 2):  # 200 s of a stranded actor while shards keep committing
        progress["count"] = next(shards)
        watch.observe([live, stranded], {"n1"}, now, committed)
    assert watch.failure is None, "others committing: waiting costs nothing"
    for now in range(201, 240, 2):  # no more commits
        watch.observe([live, stranded], {"n1"}, now, committed)
    assert watch.failure is not None
    message = str(watch.failure)
    assert "1 model actor(s) lost with their node found no room to restart for 30s" in message
    assert "no shard was committed since" in message and "--resume" in message


def test_the_watch_stops_a_waiting_driver_and_says_why():
    """The watch raises WatchAbort in the thread running the pipeline (as it waits on Ray
    Data's output queue) — with SIGINT ignored too, as a job's driver may be started — and
    the failure it found is there for the run to raise."""
    import signal
    import time

    import pytest

    from sdray.batch.actors import WatchAbort

    class Crashing(ActorWatch):
        restarts = 0

        def actors(self):
            Crashing.restarts += 1  # a crash at every look, on a node that lives on
            return [actor(restarts=Crashing.restarts)]

        def alive_nodes(self):
            return {"n1"}

    watch = Crashing(max_crashes=2, wait_s=60, every=0.01)
    deadline = time.monotonic() + 10
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(WatchAbort):
            with watch:
                while time.monotonic() < deadline:
                    time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert "batch.max_actor_restarts=2" in str(watch.failure)
