"""A Ray cluster of its own for a test: ``ray start --head --block`` on a free port of this machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def ray_head(num_cpus: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start a head node with ``num_cpus`` CPUs (its workers see ``env``); yields its address ``127.0.0.1:PORT``.

    It is stopped with SIGINT, which ``ray start --block`` answers by stopping its processes at once
    (SIGTERM makes it wait about 30 s for them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        t0 = time.time()
        while True:  # wait for the head's GCS port
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None and time.time() - t0 < 60, "ray start --head did not come up"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGINT)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)
