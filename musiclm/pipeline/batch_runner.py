"""Planned batches through decode tasks and an actor pool, out in plan order, with a watchdog.

Layer: pipeline (imports nothing of musiclm: Ray, the decode function and the actor class come in as arguments).

::

    batch i ─► decode task (CPU) ─► an actor with room (at most DEPTH calls each) ─► held until
               batches 0..i-1 are out ─► yielded to the driver (the shard writer)

Ray returns batches in whatever order tasks and actors finish. The writer gets them in plan order, so
which clips a shard holds depends on the plan only: not on the number of actors, on which decode
task was slow, or on timing. A batch enters (its decode task is submitted) only while fewer than
``window`` batches are in flight or held, so a slow batch makes the others wait, never pile up: the
reorder buffer holds at most ``window - 1`` finished batches.

The watchdog: when no batch has finished (nor an actor come up) for ``stall_seconds`` (and for 5x the slowest batch so far)
while batches are pending, :class:`Stalled` is raised with one line per thing Ray reports pending:
decode tasks and their files (and whether a CPU is free for them), actors that are not alive,
the object store when it is full.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

DEPTH = 2  # calls queued per actor: the next batch is there when the current one ends
POLL = 1.0  # seconds between watchdog checks while nothing finishes


class Stalled(Exception):
    """No batch finished for too long; ``lines`` say what Ray reports pending, one line each."""

    def __init__(self, seconds: float, lines: list[str]):
        super().__init__(f"no batch finished for {seconds:.0f} s")
        self.seconds = seconds
        self.lines = lines


class ActorLost(Exception):
    """A backbone actor or a decode task's worker died (killed for memory, its node lost, a crash in native code)."""


def reorder_window(workers: int) -> int:
    """Batches in flight or held at once: each actor busy with one and one queued, two decoding ahead."""
    return DEPTH * workers + 2


class InPlanOrder:
    """Iterate ``(item, output)`` in the order of ``items`` (dicts with ``batch`` and ``files``, plan order),
    where output is ``actor.run(decode(item))``. ``res``: the resource plan (workers, cpus, gpus, task_cpus).
    ``peak``: the most finished batches held at once, waiting for an earlier one."""

    def __init__(self, ray, decode: Callable, decode_kwargs: dict[str, Any], actor_cls: type, actor_kwargs: dict[str, Any], res, items: list[dict], stall_seconds: float):
        self.ray = ray
        self.res = res
        self.items = items
        self.stall_seconds = stall_seconds
        self.window = reorder_window(res.workers)
        self.peak = 0
        self._decode = ray.remote(num_cpus=res.task_cpus)(decode).options(name="decode")
        self._decode_kwargs = decode_kwargs
        cls = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=0)(actor_cls)
        self.actors = [cls.remote(**actor_kwargs) for _ in range(res.workers)]

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        """Submit, dispatch, collect and yield in plan order, until every item is out. One loop on purpose
        (61 lines): its books (decoding, decoded, calls, load, held, the times) are shared by every step and
        read whole by the watchdog's report, so split steps would pass them all around."""
        ray, n = self.ray, len(self.items)
        decoding: dict[Any, int] = {}  # decode ref -> item index
        decoded: dict[int, Any] = {}  # item index -> its decoded ref, waiting for an actor
        calls: dict[Any, tuple[int, int]] = {}  # actor call ref -> (item index, actor)
        load = [0] * len(self.actors)
        warm = [False] * len(self.actors)  # has finished a batch: later ones time the batch, not the actor's start-up
        since: dict[int, float] = {}  # item index -> when it entered
        started: dict[int, float] = {}  # item index -> when its actor call was submitted
        held: dict[int, dict] = {}  # item index -> output, waiting for the batches before it
        head = entered = 0
        starting = {actor.ready.remote(): a for a, actor in enumerate(self.actors)}  # an actor up counts as progress
        last = time.monotonic()
        slowest = 0.0
        while head < n:
            while entered < n and entered < head + self.window:
                ref = self._decode.remote({"index": entered, **self.items[entered]}, **self._decode_kwargs)
                decoding[ref] = entered
                since[entered] = time.monotonic()
                entered += 1
            for i in sorted(decoded):  # the earliest decoded batches to the least loaded actors
                a = min(range(len(load)), key=load.__getitem__)
                if load[a] >= DEPTH:
                    break
                calls[self.actors[a].run.remote(decoded.pop(i))] = (i, a)
                started[i] = time.monotonic()
                load[a] += 1
            refs = [*decoding, *calls, *starting]
            done = ray.wait(refs, num_returns=1, timeout=POLL, fetch_local=False)[0] if refs else []
            if done:  # and whatever else has finished meanwhile
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            for ref in done:
                if ref in starting:  # its backbones loaded: the quiet time starts again
                    del starting[ref]
                    last = time.monotonic()
                    continue
                if ref in decoding:
                    decoded[decoding.pop(ref)] = ref
                    continue
                i, a = calls.pop(ref)
                try:
                    held[i] = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # the run fails in one line; a rerun resumes
                    raise ActorLost(f"actor {a + 1} of {len(self.actors)} died while on {self._files(i)} ({_first_line(e)})") from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as e:  # its decode task's worker
                    raise ActorLost(f"the worker decoding {self._files(i)} died ({_first_line(e)})") from None
                load[a] -= 1
                now = time.monotonic()
                if warm[a]:
                    slowest = max(slowest, now - max(started[i], last))
                warm[a] = True
                started.pop(i)
                last = now
            while head in held:
                since.pop(head, None)
                yield self.items[head], held.pop(head)
                head += 1
            self.peak = max(self.peak, len(held))
            quiet = time.monotonic() - last
            if head < n and quiet > max(self.stall_seconds, 5 * slowest):
                raise Stalled(quiet, self._report(decoding, decoded, calls, load, since, started, held, head))

    def _report(self, decoding, decoded, calls, load, since, started, held, head) -> list[str]:
        """What is pending, one line each, from what this runner submitted and what Ray says of it."""
        ray, now = self.ray, time.monotonic()
        lines: list[str] = []
        free = {}
        try:
            free = ray.available_resources()
            total = ray.cluster_resources()
        except Exception:  # noqa: BLE001 - the report is best effort
            total = {}
        cpus_free, cpus = free.get("CPU", 0.0), total.get("CPU", 0.0)

        files = self._files
        slots = max(1, int(self.res.decode_cpus / self.res.task_cpus + 1e-9))  # decode tasks that run at once
        for k, i in enumerate(sorted(decoding.values())[:5]):
            if cpus_free >= self.res.task_cpus:
                why = f"running: {cpus_free:g} of {cpus:g} CPUs are free, so it is not waiting for one"
            elif k < slots:  # Ray runs tasks of equal needs in the order they were submitted
                why = f"running (it holds one of the {self.res.decode_cpus:g} CPUs left for decoding)"
            else:
                why = f"waiting for a CPU ({cpus_free:g} of {cpus:g} free): the decode tasks above hold them"
            lines.append(f"decode task of {files(i)}: not returned after {now - since[i]:.0f} s, {why}")
        for i, a in sorted(calls.values())[:5]:
            lines.append(f"actor {a + 1} of {len(self.actors)}: {files(i)} not returned after {now - started[i]:.0f} s")
        if decoded:
            lines.append(f"{len(decoded)} decoded batch{'es' if len(decoded) != 1 else ''} waiting for an actor")
        lines += self._actor_lines(free)
        if held:
            lines.append(f"{len(held)} later batch{'es' if len(held) != 1 else ''} finished and wait for {files(head)} (reorder buffer, at most {self.window - 1})")
        store, store_free = total.get("object_store_memory", 0.0), free.get("object_store_memory", 0.0)
        if store and store_free < 0.1 * store:
            lines.append(f"the object store is full: {store_free / 2**30:.1f} of {store / 2**30:.1f} GiB free")
        return lines

    def _files(self, i: int) -> str:
        """``batch N (its files)`` of item ``i``, for messages."""
        import json

        names = [rel for rel, _ in json.loads(self.items[i]["files"])]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"batch {self.items[i]['batch']} ({shown})"

    def _actor_lines(self, free: dict) -> list[str]:
        """Actors that are not alive, as the GCS reports them (state, death cause; what they wait for)."""
        try:
            from ray._private import state

            table = state.actors()
        except Exception:  # noqa: BLE001 - private API: the report goes on without it
            return []
        lines = []
        for a, handle in enumerate(self.actors):
            info = table.get(handle._actor_id.hex(), {})
            st = info.get("State", "")
            if st and st != "ALIVE":
                need = f"needs {self.res.cpus:g} CPU and {self.res.gpus:g} GPU; free: {free.get('CPU', 0.0):g} CPU, {free.get('GPU', 0.0):g} GPU"
                cause = str(info.get("DeathCause") or "").strip().splitlines()
                lines.append(f"actor {a + 1} of {len(self.actors)}: {st}" + (f" ({cause[0][:200]})" if cause else f" ({need})"))
        return lines


def _first_line(e: Exception) -> str:
    """The first line of a Ray error that says something (Ray's messages run to many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__
