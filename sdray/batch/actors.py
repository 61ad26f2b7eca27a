"""The model actors' fate, watched from the driver while a run's pipeline runs.

Ray Data restarts a model actor that died, wherever there is room for it, and retries the
units it held on it (`max_restarts=-1`, `max_task_retries=-1`, Ray Data's own defaults). Ray
alone cannot tell the two reasons an actor dies apart, and sdray must:

- **its node was lost** (a spot node reclaimed, a raylet killed): no fault of the actor's. Until
  the GCS declares the node dead, Ray reports the actor "temporarily unavailable"; that takes
  `health_check_period_ms` x `health_check_failure_threshold` (3 s x 5 by default, plus the
  `health_check_timeout_ms` of the last check) — tens of seconds — and any budget of task
  retries can run out before it (what issue 24 saw). So a unit's retries are unbounded, and a
  lost node never counts against anything: the actor restarts on a live node, its units with it.
- **it crashed** on a node that lives on (native code, out of host memory, a device fault after
  which the actor exits on purpose): the same unit may well crash it again, so crashes are
  counted, and an actor that crashed more than `batch.max_actor_restarts` times fails the run.

And when a model actor lost with its node finds no room to restart (no node with a free GPU
joined), the units it held wait for it. While the other actors go on committing shards that
costs nothing; once some actor has waited `batch.actor_wait_s` and no shard has been committed
for as long — every node with model actors lost, or the others done with all they could do —
the run fails saying so, rather than wait forever. Committed shards are kept either way;
`--resume` goes on with the nodes there are.

The watch reads the GCS's actor and node tables (no dashboard needed) every `every` seconds in
a daemon thread; to stop the run it raises `WatchAbort` in the thread running the pipeline
(waiting on Ray Data's output queue), and `failure` says why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sdray.errors import SdrayError

log = logging.getLogger(__name__)

# Ray Data names a model actor after the map_batches callable: MapWorker(MapBatches(UnitStage)).
MODEL_ACTOR_MARK = "UnitStage"
ALIVE, RESTARTING = "ALIVE", "RESTARTING"


class WatchAbort(BaseException):
    """Raised by the watch in the thread running the pipeline, to stop it; `failure` says
    why. A BaseException, so nothing on Ray Data's side catches it on the way out."""


def _raise_in(thread_id: int, exception: type[BaseException]) -> None:
    """Raise `exception` in another thread of this process at its next Python instruction
    (CPython's PyThreadState_SetAsyncExc). Not a signal: a driver started with SIGINT ignored
    (as a `ray job submit` entrypoint can be) would never see `_thread.interrupt_main`."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception)
    )


@dataclass
class ActorRecord:
    """What the watch knows of one model actor."""

    restarts: int = 0
    node: str | None = None  # the node it last lived on
    crashes: int = 0
    node_losses: int = 0


@dataclass
class ActorWatch:
    """Counts model actors' crashes and node losses; fails the run past its limits."""

    max_crashes: int
    wait_s: float
    committed: Callable[[], int] = lambda: 0  # the output's committed shards, counted
    every: float = 1.0
    failure: SdrayError | None = None
    records: dict[str, ActorRecord] = field(default_factory=dict)
    progress_every: float = 10.0  # seconds between two counts of committed shards
    _waiting_since: float | None = None  # since when some actor waits to restart
    _progress_at: float = 0.0  # when the count of committed shards last grew
    _committed: int = 0
    _looked_at: float = float("-inf")
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _runner: int = 0
    _thread: threading.Thread | None = None

    # -- what the GCS says (replaced in unit tests) --------------------------------------------
    @staticmethod
    def actors() -> list[dict]:
        """This job's model actors: id, state, restarts, node."""
        import ray
        from ray._private import state

        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        found = []
        for actor_id, info in state.actors(job_id=job).items():
            if MODEL_ACTOR_MARK not in info.get("ActorClassName", ""):
                continue
            found.append(
                {
                    "id": actor_id,
                    "state": info.get("State"),
                    "restarts": int(info.get("NumRestarts", 0) or 0),
                    "node": (info.get("Address") or {}).get("NodeID") or None,
                }
            )
        return found

    @staticmethod
    def alive_nodes() -> set[str]:
        import ray

        return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}

    # -- the rules -----------------------------------------------------------------------------
    def observe(
        self, actors: list[dict], alive_nodes: set[str], now: float, committed: Callable[[], int]
    ) -> None:
        """Take one look at the actors; sets `failure` once a limit is passed. `committed`
        counts the output's committed shards: the run's progress, looked at only while an
        actor waits to restart."""
        for actor in actors:
            # Every model actor of the job is the watch's to see from its start: restarts
            # already made before its first look count too (its node unknown: as crashes).
            record = self.records.setdefault(actor["id"], ActorRecord())
            died = actor["restarts"] - record.restarts
            if died > 0:
                # The GCS restarts an actor of a lost node only once it has declared the node
                # dead, so a lost node is no longer alive by the time its restart shows.
                if record.node is not None and record.node not in alive_nodes:
                    record.node_losses += died
                    log.warning("a model actor's node was lost; it is restarted elsewhere")
                else:
                    record.crashes += died
                    log.warning("a model actor crashed (%d times so far)", record.crashes)
                record.restarts = actor["restarts"]
            if actor["node"]:  # where it lives, or is being started
                record.node = actor["node"]
            if record.crashes > self.max_crashes:
                self.failure = SdrayError(
                    f"a model actor crashed {record.crashes} times "
                    f"(batch.max_actor_restarts={self.max_crashes}): a crash in native code, "
                    "out of memory, or a device fault; the Ray logs say which. Committed "
                    "shards are kept; continue with --resume."
                )
                return
        waiting = [actor for actor in actors if actor["state"] == RESTARTING]
        if not waiting:
            self._waiting_since = None
            return
        if self._waiting_since is None:  # an actor died: from now on, watch for progress
            self._waiting_since, self._progress_at = now, now
            self._committed = committed()
            return
        if now - self._progress_at < self.wait_s:
            # While other actors go on committing shards, waiting costs nothing.
            if now - self._looked_at >= self.progress_every:
                self._looked_at = now
                count = committed()
                if count != self._committed:
                    self._committed, self._progress_at = count, now
            return
        if now - self._waiting_since < self.wait_s:
            return
        alive = sum(actor["state"] == ALIVE for actor in actors)
        lost = sum(record.node_losses for record in self.records.values())
        if alive:
            what = (
                f"{len(waiting)} model actor(s) lost with their node found no room to restart "
                f"for {self.wait_s:.0f}s (batch.actor_wait_s) and no shard was committed "
                "since: the units they hold wait for them"
            )
        else:
            what = (
                f"no model actor has been alive for {self.wait_s:.0f}s (batch.actor_wait_s): "
                f"the nodes that held them were lost ({lost} actor restarts after a node "
                "loss) and no node with room for one joined"
            )
        self.failure = SdrayError(
            f"{what}. Committed shards are kept; continue with --resume (on the nodes there "
            "are, or once nodes join)."
        )

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.observe(self.actors(), self.alive_nodes(), time.monotonic(), self.committed)
            except Exception as error:  # noqa: BLE001 - a GCS hiccup: look again next time
                log.debug("actor watch: %s", error)
                continue
            if self.failure is not None:
                log.error("%s", self.failure)
                with self._lock:  # never once the pipeline is over (see __exit__)
                    if not self._stop.is_set():
                        _raise_in(self._runner, WatchAbort)
                return

    def __enter__(self) -> ActorWatch:
        self._runner = threading.get_ident()  # the thread that runs the pipeline
        self._thread = threading.Thread(target=self._run, name="sdray-actor-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        # An interrupt sent before this lands here at the latest, inside the caller's `with`.
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
