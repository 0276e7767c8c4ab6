"""Start and stop private libvirt daemons (no systemd here) for the libvirt backend's tests.

``LibvirtDaemons`` starts ``virtlogd`` (only if none is answering on the system
socket, because libvirtd's QEMU driver always talks to the system one) and a
``libvirtd`` with its own config, socket directory and pidfile, and gives the
URI of that private socket (``qemu:///system?socket=...``). ``stop()`` ends the
daemons it started, by the pids in their own pidfiles, and nothing else.

Needs root (the QEMU driver's system instance). Only one system libvirtd can
own /run/libvirt/qemu at a time: when one is already running (it answers on
/run/libvirt/libvirt-sock) we use it instead of starting a second one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from h2k.errors import H2KError

SYSTEM_RUN = Path("/run/libvirt")
VIRTLOGD_SOCK = SYSTEM_RUN / "virtlogd-sock"
SYSTEM_SOCK = SYSTEM_RUN / "libvirt-sock"
# Held while our private libvirtd lives: a second one (another test worker) would
# fight over /run/libvirt/qemu, so it waits for the first to finish instead.
LOCK_FILE = Path("/run/lock/h2k-libvirtd.lock")


def _answers(sock: Path) -> bool:
    """True if something accepts connections on this UNIX socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pid_alive(pid: int) -> bool:
    try:
        # A daemon's parent may be a PID 1 that never reaps: a zombie has ended.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_socket(sock: Path, pid: int, deadline: float, what: str) -> None:
    # The daemon reports readiness only by accepting connections: poll for it, bounded.
    while time.monotonic() < deadline:
        if _answers(sock):
            return
        if not _pid_alive(pid):
            raise H2KError(f"{what} (pid {pid}) exited during start-up")
        time.sleep(0.05)
    raise H2KError(f"{what} did not open {sock} in time")


@dataclass
class LibvirtDaemons:
    """Private libvirtd (+ virtlogd when needed). Use as a context manager or start()/stop()."""

    base: Path | None = None
    started_pids: dict[str, int] = field(default_factory=dict)
    uri: str = ""
    _own_base: bool = False
    _lock_fh: object = None
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> str:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # whatever did start is stopped again
            raise

    def _start(self, timeout: float) -> str:
        if os.geteuid() != 0:
            raise H2KError("starting libvirtd for qemu:///system needs root")
        for tool in ("libvirtd", "virtlogd"):
            if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
                raise H2KError(f"{tool} not found (install libvirt-daemon-system)")
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(LOCK_FILE, "w")
        fcntl.flock(self._lock_fh, fcntl.LOCK_EX)  # blocks until another lab's daemons have stopped
        deadline = time.monotonic() + timeout
        if self.base is None:
            # World-traversable: QEMU may run as libvirt-qemu and must reach the sockets here.
            self.base = Path(tempfile.mkdtemp(prefix="h2k-libvirtd-"))
            self._own_base = True
        self.base.chmod(0o755)
        SYSTEM_RUN.mkdir(parents=True, exist_ok=True)

        if not _answers(VIRTLOGD_SOCK):
            pid = self._spawn("virtlogd", ["-p", str(self.base / "virtlogd.pid")])
            _wait_socket(VIRTLOGD_SOCK, pid, deadline, "virtlogd")

        if _answers(SYSTEM_SOCK):
            self.uri = "qemu:///system"  # someone else's daemon: use it, never stop it
            return self.uri
        conf = self.base / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.base}"\n'
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0770"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            'log_outputs = "3:file:' + str(self.base / "libvirtd.log") + '"\n'
        )
        pid = self._spawn("libvirtd", ["-f", str(conf), "-p", str(self.base / "libvirtd.pid")])
        sock = self.base / "libvirt-sock"
        _wait_socket(sock, pid, deadline, "libvirtd")
        self.uri = f"qemu:///system?socket={sock}"
        return self.uri

    def _spawn(self, tool: str, args: list[str]) -> int:
        # Foreground children (no -d): we own them, know their pids and reap them.
        exe = shutil.which(tool) or f"/usr/sbin/{tool}"
        assert self.base is not None
        log = open(self.base / f"{tool}.out", "wb")
        try:
            proc = subprocess.Popen([exe, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        self._procs[tool] = proc
        self.started_pids[tool] = proc.pid
        return proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the daemons we started (libvirtd first), by pid; SIGKILL if they linger."""
        for name in ("libvirtd", "virtlogd"):
            proc = self._procs.pop(name, None)
            self.started_pids.pop(name, None)
            if proc is None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._lock_fh is not None:
            self._lock_fh.close()  # releases the flock
            self._lock_fh = None
        if self._own_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "LibvirtDaemons":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
