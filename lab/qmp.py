"""A small synchronous QMP client over a UNIX socket.

One reader thread parses the line-delimited JSON stream: command replies are
matched to callers by ``id``; events go to a queue (``wait_event``) and to
optional listeners (the lab's scorer). Every message, both directions, is
appended to a JSONL log with a timestamp and direction, so a boot's QMP
conversation is evidence. ``qemu.qmp`` on PyPI is asyncio-only; this is all the
lab needs and has no dependency.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lab.unixsock import connect_unix


class QMPError(Exception):
    """A QMP command returned an error, or the connection failed."""


class QMPClosed(QMPError):
    """The connection closed (QEMU exited) while waiting."""


EventListener = Callable[[dict[str, Any]], None]
# QEMU's replies and events are small; a line longer than this (no line end) ends the connection
# instead of growing the lab's memory.
MAX_MESSAGE = 16 << 20


class QMPClient:
    def __init__(self, path: str | os.PathLike, log_path: str | os.PathLike | None = None) -> None:
        self.path = str(path)
        self.log_path = Path(log_path) if log_path else None
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, "queue.Queue[dict[str, Any]]"] = {}
        self._pending_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._log_fh = open(self.log_path, "a", buffering=1) if self.log_path else None
        self.events: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self._listeners: list[EventListener] = []
        self._reader: threading.Thread | None = None
        self.closed = threading.Event()
        self.greeting: dict[str, Any] | None = None

    # -- connection --------------------------------------------------------
    def connect(self, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Connect (QEMU listens with server=on,wait=off), read the greeting, negotiate.

        ``alive`` (e.g. "the QEMU process still runs") stops the retries early when QEMU died.
        """
        deadline = time.monotonic() + timeout
        try:
            sock = connect_unix(self.path, timeout, alive)
        except OSError as exc:
            raise QMPError(f"cannot connect to QMP socket {self.path}: {exc}") from exc
        self._sock = sock
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        fh = sock.makefile("rb")
        line = fh.readline(MAX_MESSAGE + 1)
        if not line:
            raise QMPError("QMP closed before its greeting")
        try:
            self.greeting = json.loads(line)
        except ValueError:
            raise QMPError(f"QMP greeting is not JSON: {line[:80]!r}") from None
        self._log("in", self.greeting)
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, args=(fh,), name="qmp-reader", daemon=True)
        self._reader.start()
        self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        return self.greeting

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=2)
        if self._log_fh:
            with self._log_lock:
                self._log_fh.close()
                self._log_fh = None

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- listeners and events ---------------------------------------------
    def add_listener(self, fn: EventListener) -> None:
        """Call ``fn(event)`` from the reader thread for every event (and once with
        ``{"event": "__closed__"}`` when the connection ends)."""
        self._listeners.append(fn)

    def wait_event(self, names: str | set[str], timeout: float) -> dict[str, Any] | None:
        """The next queued event whose name is in ``names`` (others are dropped), or None at the deadline."""
        wanted = {names} if isinstance(names, str) else set(names)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                return None
            if ev.get("event") in wanted:
                return ev
            if ev.get("event") == "__closed__":
                self.events.put(ev)  # keep telling later waiters
                raise QMPClosed("QMP connection closed while waiting for " + ",".join(sorted(wanted)))

    # -- commands ------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        if self._sock is None:
            raise QMPError("not connected")
        if self.closed.is_set():
            raise QMPClosed(f"QMP closed; cannot run {command}")
        cid = f"h2k-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        box: "queue.Queue[dict[str, Any]]" = queue.Queue(maxsize=1)
        with self._pending_lock:
            self._pending[cid] = box
        self._log("out", msg)
        try:
            with self._write_lock:
                self._sock.sendall(json.dumps(msg).encode() + b"\n")
            try:
                reply = box.get(timeout=timeout)
            except queue.Empty:
                raise QMPError(f"QMP command {command} timed out after {timeout:.0f}s") from None
        except OSError as exc:
            raise QMPClosed(f"QMP connection lost during {command}: {exc}") from exc
        finally:
            with self._pending_lock:
                self._pending.pop(cid, None)
        if reply.get("__closed__"):
            raise QMPClosed(f"QMP closed during {command}")
        if "error" in reply:
            err = reply["error"]
            raise QMPError(f"{command}: {err.get('class')}: {err.get('desc')}")
        return reply.get("return")

    # -- internals -----------------------------------------------------------
    def _read_loop(self, fh: Any) -> None:
        try:
            while True:
                line = fh.readline(MAX_MESSAGE + 1)
                if not line:
                    break
                if len(line) > MAX_MESSAGE:
                    self._log("in-garbage", {"raw": f"{len(line)} bytes without a line end: connection dropped"})
                    break
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = None
                if not isinstance(msg, dict):
                    self._log("in-garbage", {"raw": line.decode(errors="replace")[:4096]})
                    continue
                self._log("in", msg)
                if "event" in msg:
                    self.events.put(msg)
                    for fn in list(self._listeners):
                        fn(msg)
                elif "id" in msg:
                    with self._pending_lock:
                        box = self._pending.get(str(msg["id"]))
                    if box is not None:
                        box.put(msg)
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            with self._pending_lock:
                for box in self._pending.values():
                    box.put({"__closed__": True})
            closed = {"event": "__closed__", "timestamp": _now_stamp()}
            self.events.put(closed)
            for fn in list(self._listeners):
                fn(closed)

    def _log(self, direction: str, msg: dict[str, Any]) -> None:
        if not self._log_fh:
            return
        rec = {"t": round(time.time(), 6), "dir": direction, "msg": msg}
        with self._log_lock:
            if self._log_fh:
                self._log_fh.write(json.dumps(rec) + "\n")


def _now_stamp() -> dict[str, int]:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t % 1) * 1e6)}
