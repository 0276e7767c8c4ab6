"""What the libvirt backend reads through libvirt streams: the serial console and the screen.

Neither needs a file or socket on the libvirt host to be reachable from the lab:

- ``ConsoleStream``: COM1 (a pty on the host) through ``virDomainOpenConsole``, read on
  libvirt's event-loop thread from a non-blocking stream, teed to the local
  ``serial.log`` and fed to the same ``ConsoleScanner`` (and callback) as the direct
  backend's ``SocketWatcher``.
- ``screenshot``: ``virDomainScreenshot`` of the first head, fetched over a stream
  (PNG from QEMU >= 7.1; older hosts send PPM).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import libvirt

from lab.console import ConsoleEvent, ConsoleScanner

_IO_EVENTS = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
SCREEN_NAMES = {"image/png": "screen.png", "image/x-portable-pixmap": "screen.ppm"}


def call_on_event_loop(fn: Callable[[], None], timeout: float) -> bool:
    """Run ``fn`` on libvirt's event-loop thread (where the stream callbacks run) and wait for it.
    False if it did not finish within ``timeout`` seconds."""
    done = threading.Event()

    def tick(timer: int, opaque: Any) -> None:
        libvirt.virEventRemoveTimeout(timer)
        try:
            fn()
        finally:
            done.set()

    libvirt.virEventAddTimeout(0, tick, None)
    return done.wait(timeout)


class ConsoleStream:
    """The domain's console over a libvirt stream. The event loop (``virEventRegisterDefaultImpl``)
    must be running; open it while the domain is paused so no output is missed.

    Every stream operation after the start runs on the event-loop thread, and the stream is
    closed while the domain still runs (``close`` before ``virDomainDestroy``): a console stream
    finished or aborted while the host tears the domain down can hang the client or libvirtd.
    At the end of the stream (the guest powered off or reset) nothing is sent to the host.
    """

    def __init__(self, conn: "libvirt.virConnect", dom: "libvirt.virDomain", scanner: ConsoleScanner,
                 on_event: Callable[[ConsoleEvent], None], tee: Path) -> None:
        self.conn = conn
        self.dom = dom
        self.scanner = scanner
        self.on_event = on_event
        self.tee = tee
        self.bytes_read = 0
        self._stream: "libvirt.virStream | None" = None
        self._fh: Any = None
        self._closed = threading.Event()

    def start(self) -> None:
        self._fh = open(self.tee, "ab")
        self._stream = self.conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        # FORCE: a console session someone left open on the host must not keep us out.
        self.dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._stream.eventAddCallback(_IO_EVENTS, self._on_io, None)

    # -- on the event-loop thread ------------------------------------------
    def _on_io(self, stream: "libvirt.virStream", events: int, opaque: Any) -> None:
        if self._closed.is_set():
            return
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            while True:
                try:
                    data = stream.recv(65536)
                except libvirt.libvirtError:
                    self._close(abort=False)  # the host ended it with an error: nothing to tell it
                    return
                if data == -2:  # nothing more for now
                    break
                if not data:  # end of stream: the domain is gone
                    self._close(abort=False)
                    return
                self._consume(data)
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._close(abort=False)

    def _consume(self, data: bytes) -> None:
        self.bytes_read += len(data)
        self._fh.write(data)
        self._fh.flush()
        for ev in self.scanner.feed(data):
            self.on_event(ev)

    def _close(self, abort: bool) -> None:
        if self._closed.is_set():
            return
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.eventRemoveCallback()
            except libvirt.libvirtError:
                pass
            if abort:
                try:
                    stream.abort()
                except libvirt.libvirtError:
                    pass
        for ev in self.scanner.finish():
            self.on_event(ev)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._closed.set()

    # -- from the boot's thread ----------------------------------------------
    def wait_closed(self, timeout: float) -> bool:
        """True once the stream has ended (the domain stopped and the last bytes are read)."""
        return self._closed.wait(timeout)

    def close(self, domain_running: bool, timeout: float = 10.0) -> None:
        """While the domain runs: abort the stream (on the event loop). After it stopped: wait
        for the end of the stream, and if it does not come, only stop listening."""
        if self._closed.is_set():
            return
        if domain_running:
            call_on_event_loop(lambda: self._close(abort=True), timeout)
        elif not self.wait_closed(timeout):
            call_on_event_loop(lambda: self._close(abort=False), timeout)


@contextlib.contextmanager
def blocking_stream(conn: "libvirt.virConnect") -> Iterator["libvirt.virStream"]:
    """A blocking stream for one whole transfer: finished when the block ends, aborted if it raises."""
    stream = conn.newStream(0)
    try:
        yield stream
    except BaseException:
        try:
            stream.abort()
        except libvirt.libvirtError:
            pass
        raise
    stream.finish()


def screenshot(conn: "libvirt.virConnect", dom: "libvirt.virDomain") -> tuple[bytes, str]:
    """The screen of head 0 and its MIME type."""
    buf = bytearray()
    with blocking_stream(conn) as stream:
        mime = dom.screenshot(stream, 0, 0)
        stream.recvAll(lambda st, data, acc: acc.extend(data) or len(data), buf)
    return bytes(buf), mime
