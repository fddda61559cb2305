"""The Ray runtime of the tokenize job: starting or joining Ray, what the actors reserve, stopping cleanly.

Layer: pipeline (imports only the base layer).

Without ``--address`` the job starts a local Ray on this machine; with it, it joins a cluster
(checked reachable first, :func:`check_reachable`, so a bad address fails in seconds).
:func:`plan_resources` decides what each backbone actor reserves so that decoding always keeps a
CPU; :func:`stop_on_signals` turns SIGINT and SIGTERM into one-line
:class:`~musiclm.errors.Stopped`, installed again once Ray has started (:func:`ray_session`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from musiclm.errors import Stopped, UserError


def _quiet_ray_loggers() -> None:
    # Ray and Ray Data log progress and notices at INFO/WARNING; the rich progress line says it all
    for name in list(logging.root.manager.loggerDict):
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.ERROR)


def check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's many minutes of retries, when HOST:PORT does not answer."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray resolves those itself
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): check --address, or drop it to start a local Ray") from None


def _token_auth_for_clients() -> None:
    """Send this machine's Ray token when joining a cluster.

    A head started with ``ray start --head`` enables token authentication when a token
    exists, but ``ray.init(address=...)`` attaches the token only when RAY_AUTH_MODE says
    so (ray-project/ray#64755); a head without authentication ignores the token.
    """
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file()
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, initialised for the job: a new local instance (``address`` None) or the cluster at
    ``address`` (checked by :func:`check_reachable` before the fit plan); shut down at the end if started here."""
    if address:
        _token_auth_for_clients()  # before Ray is imported: it reads RAY_AUTH_MODE once
    import ray
    import ray.data

    _quiet_ray_loggers()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": a new instance even when `ray start` runs a cluster on this machine
                ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise UserError(f"cannot start or join {where}: {str(e).splitlines()[0]}") from None
        started = True
    _reinstall_stop_handler()
    _quiet_ray_loggers()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


class Resources(NamedTuple):
    """The resource plan of the actor pool (:func:`plan_resources`)."""

    workers: int  # actors in the pool
    gpus: float  # per actor
    cpus: float  # per actor, reserved
    threads: int  # torch threads per actor
    decode_cpus: float = 1.0  # CPUs the actors leave to the decode tasks
    task_cpus: float = 1.0  # what one decode task reserves
    cluster_cpus: float = 0.0
    cluster_gpus: float = 0.0

    def line(self) -> str:
        """The plan as the start-up line prints it."""
        n = lambda x: f"{x:g}"  # noqa: E731
        return (
            f"resources: {self.workers} actor{'s' if self.workers != 1 else ''} x ({n(self.cpus)} CPU, {n(self.gpus)} GPU, "
            f"{self.threads} thread{'s' if self.threads != 1 else ''}); {n(self.decode_cpus)} CPU left for decoding "
            f"(Ray cluster: {n(self.cluster_cpus)} CPUs, {n(self.cluster_gpus)} GPUs)"
        )


# the least CPU an actor is given: a GPU actor only feeds its GPU; a CPU actor under half a core is not worth starting
MIN_ACTOR_CPUS = {True: 0.25, False: 0.5}


def plan_resources(cpus: float, gpus: float, workers: int | None, gpus_per_worker: float | None) -> Resources:
    """What each actor reserves on a cluster of ``cpus`` CPUs and ``gpus`` GPUs, so that decoding always has
    room: at least one CPU (half of a lone one) is left to the decode tasks that feed the actors, else the
    actors wait for ever on a batch that no CPU decodes. Actors reserve the cores their torch threads use
    where they can, fewer (fractions) where they cannot. ``workers`` None: one per GPU (else one), as many
    as fit. An arrangement that cannot leave decode room is refused in one line (UserError)."""
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1 else 0.0
    if gpus_per_worker > 0 and gpus < gpus_per_worker:
        raise UserError(f"--gpus-per-worker {gpus_per_worker:g} but the Ray cluster has {gpus:g} GPUs")
    gpu = gpus_per_worker > 0
    decode = 1.0 if cpus >= 2 else cpus / 2
    fit = int((cpus - decode) / MIN_ACTOR_CPUS[gpu] + 1e-9)  # actors the CPUs hold besides decoding
    by_gpu = int(gpus / gpus_per_worker + 1e-9) if gpu else 1
    if workers is None:
        workers = max(1, min(by_gpu, fit))
    if gpu and workers > by_gpu:
        raise UserError(
            f"--workers {workers} with {gpus_per_worker:g} GPU each needs {workers * gpus_per_worker:g} GPUs, but the Ray cluster has {gpus:g}: "
            f"use --workers {by_gpu}, or a smaller --gpus-per-worker"
        )
    if workers > fit:
        way = f"use --workers {fit}, or a cluster with more CPUs" if fit else "use a cluster with more CPUs"
        cluster = f"{cpus:g} CPU{'s' if cpus != 1 else ''}" + (f" and {gpus:g} GPUs" if gpu else "")
        raise UserError(f"--workers {workers} leaves no CPU for decoding on a cluster of {cluster}: {way}")
    threads = actor_threads(int(cpus), workers, gpu)
    per = min(float(threads), math.floor((cpus - decode) / workers * 100) / 100)  # Ray takes fractions to 1e-4
    left = round(cpus - workers * per, 4)
    return Resources(workers, gpus_per_worker, per, threads, left, min(1.0, left), float(cpus), float(gpus))


def plan_cluster_resources(ray, workers: int | None, gpus_per_worker: float | None) -> Resources:
    """:func:`plan_resources` for the CPUs and GPUs of the running Ray cluster."""
    total = ray.cluster_resources()
    return plan_resources(float(total.get("CPU", 0)), float(total.get("GPU", 0)), workers, gpus_per_worker)


def actor_threads(cpus: int, workers: int, gpu: bool) -> int:
    """torch threads per actor. Without GPUs the actors do the heavy lifting; one core is left to
    decoding when there are several. (Tokens are bitwise reproducible at a given thread count.)"""
    if gpu:
        return max(1, min(4, cpus // workers))
    return max(1, (max(1, cpus - 1) if cpus > 1 else 1) // workers)


@contextmanager
def stop_on_signals(stopped_line: Callable[[], str]) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`~musiclm.errors.Stopped`, raised in the main thread: the run unwinds
    (Ray shut down, the lock released, finished shards kept) and the CLI prints one line, ``stopped_line()``
    (asked when the signal comes). Installed again after ``ray.init`` (:func:`ray_session`), whose core worker
    would otherwise print a C++ stack dump on SIGTERM."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal while unwinding does not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(stopped_line(), signum)

    saved = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    global _STOP_HANDLER
    _STOP_HANDLER = stop
    try:
        yield
    finally:
        _STOP_HANDLER = None
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_STOP_HANDLER = None  # the handler of the run under way, installed again once Ray has started


def _reinstall_stop_handler() -> None:
    import signal

    if _STOP_HANDLER is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _STOP_HANDLER)

