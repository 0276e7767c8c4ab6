"""Connecting to the UNIX sockets QEMU (or libvirt) creates for QMP, the console and the agent."""

from __future__ import annotations

import socket
import time
from typing import Callable


def connect_unix(path: str, timeout: float, alive: Callable[[], bool] | None = None) -> socket.socket:
    """Connect to ``path``, retrying while the socket does not exist or nobody listens yet
    (QEMU creates its sockets during start-up). Gives up at ``timeout`` seconds, or at once when
    ``alive()`` says the process that should listen has gone; the last error is raised then."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline or (alive is not None and not alive()):
                raise
            time.sleep(0.02)
