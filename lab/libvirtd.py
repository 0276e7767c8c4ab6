"""A private libvirt host for the libvirt backend's tests: a libvirtd that shares no files with the lab.

There is no systemd here, and the point of these tests is a host the lab cannot
reach through the file system, so ``LibvirtDaemons`` starts ``virtlogd`` and
``libvirtd`` in a mount namespace of their own (``unshare --mount``):

- its own ``/etc/libvirt`` (a ``libvirtd.conf`` that listens on 127.0.0.1:PORT over
  plain TCP, ``auth_tcp = "none"``; a ``qemu.conf`` with the distribution's defaults but
  for the devices cgroup, see ``QEMU_CONF``), ``/var/lib/libvirt`` (storage pools, QEMU's
  home), ``/var/cache/libvirt``, ``/var/log/libvirt`` (QEMU's logs), an empty
  ``/run`` and ``/var/log``, and a private swtpm CA directory — all under one
  temp dir of the caller's;
- empty file systems over the places the lab's files live (``/tmp``, ``/var/tmp``,
  ``/root``, ``/home``, ``/boot``, ``/work``, the repository, the caller's temp dir
  and home): a domain that names one of the lab's paths cannot start.

The lab reaches it only as ``qemu+tcp://127.0.0.1:PORT/system``, like a remote host.
QEMU runs as the daemon's own unprivileged user (``libvirt-qemu`` on Debian).
``stop()`` destroys what is left running, ends the two daemons by pid (then any QEMU or
swtpm they started and left, by the pids in their pidfiles), and removes the temp dir.
Several of these can run side by side (separate namespaces, ports and directories).

The TCP socket takes no authentication: any local user can use this daemon while it
runs (as root). It lives for the duration of a test module on a CI machine; do not
run the boot tests on a host shared with people you do not trust.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from h2k.errors import H2KError

REPO = Path(__file__).resolve().parents[1]
# Where a lab's files usually are: none of them exists inside the daemon's namespace.
HIDDEN = ("/tmp", "/var/tmp", "/root", "/home", "/boot", "/work", "/srv", "/mnt", "/media")
STOP_ORDER = ("libvirtd", "virtlogd")


def _pid_alive(pid: int) -> bool:
    try:
        # A daemon's parent may be a PID 1 that never reaps: a zombie has ended.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _answers_unix(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _answers_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, pid: int, deadline: float, what: str) -> None:
    # The daemons report readiness only by accepting connections: poll, bounded.
    while time.monotonic() < deadline:
        if ready():
            return
        if not _pid_alive(pid):
            raise H2KError(f"{what} (pid {pid}) exited during start-up")
        time.sleep(0.05)
    raise H2KError(f"{what} did not start listening in time")


def hidden_paths() -> list[str]:
    """Existing directories to cover with an empty tmpfs inside the namespace."""
    extra = [str(Path.home()), tempfile.gettempdir(), str(REPO)]
    found = {os.path.realpath(p) for p in (*HIDDEN, *extra)}
    found = {p for p in found if p != "/" and os.path.isdir(p)}
    # A path under another hidden one is covered already (and has no mount point inside the tmpfs).
    return sorted(p for p in found if not any(p.startswith(q + "/") for q in found))


def namespace_script(base: Path, hide: list[str]) -> str:
    """The shell run inside the new mount namespace before it execs virtlogd."""
    q = shlex.quote
    lines = [
        "set -e",
        # Private /run and /var/log (virtlogd/libvirtd sockets, pidfiles, swtpm logs).
        "mount -t tmpfs -o mode=0755 h2k-run /run",
        "mkdir -p /run/libvirt /run/lock",
        "mount -t tmpfs -o mode=0755 h2k-log /var/log",
        "mkdir -p /var/log/libvirt",
    ]
    for src, dst in (("etc", "/etc/libvirt"), ("lib", "/var/lib/libvirt"), ("cache", "/var/cache/libvirt"),
                     ("log", "/var/log/libvirt")):
        lines.append(f"mount --bind {q(str(base / src))} {dst}")
    if os.path.isdir("/var/lib/swtpm-localca"):
        tss = _uid("tss")
        lines.append(f"mount -t tmpfs -o mode=0750,uid={tss} h2k-swtpm /var/lib/swtpm-localca")
    for p in hide:  # after the binds: the base dir itself may be under a hidden path
        mode = "1777" if p in ("/tmp", "/var/tmp", os.path.realpath(tempfile.gettempdir())) else "0755"
        lines.append(f"mount -t tmpfs -o mode={mode} h2k-hidden {q(p)}")
    lines.append(f"exec {q(shutil.which('virtlogd') or '/usr/sbin/virtlogd')}")
    return "\n".join(lines) + "\n"


def _uid(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return 0


def libvirtd_conf(port: int) -> str:
    return (
        "listen_tls = 0\n"
        "listen_tcp = 1\n"
        'listen_addr = "127.0.0.1"\n'
        f'tcp_port = "{port}"\n'
        'auth_tcp = "none"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    )


# The QEMU driver's defaults (QEMU as libvirt-qemu, DAC relabelling, a mount namespace per
# QEMU), except the devices cgroup: its BPF program fails to load now and then on this
# kernel ("failed to load cgroup BPF prog: Resource temporarily unavailable").
QEMU_CONF = 'cgroup_controllers = [ "cpu", "cpuacct", "cpuset", "memory", "blkio" ]\n'


@dataclass
class LibvirtDaemons:
    """A private, file-system-isolated libvirtd reached over loopback TCP. start()/stop() or a context manager."""

    base: Path | None = None
    uri: str = ""
    port: int = 0
    started_pids: dict[str, int] = field(default_factory=dict)
    _own_base: bool = False
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # Daemon-side directories, seen from the lab (for the tests' own checks, never for the backend).
    @property
    def qemu_log_dir(self) -> Path:
        assert self.base is not None
        return self.base / "log" / "qemu"

    @property
    def storage_dir(self) -> Path:
        assert self.base is not None
        return self.base / "lib" / "images"

    def start(self, timeout: float = 60.0) -> str:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # whatever did start is stopped again
            raise

    def _start(self, timeout: float) -> str:
        if os.geteuid() != 0:
            raise H2KError("starting a system libvirtd needs root")
        for tool in ("libvirtd", "virtlogd", "unshare", "nsenter"):
            if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}")):
                raise H2KError(f"{tool} not found (packages: libvirt-daemon-system, util-linux)")
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="h2k-libvirtd-"))
            self._own_base = True
        deadline = time.monotonic() + timeout
        for sub in ("", "etc", "lib", "lib/images", "cache", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
            (self.base / sub).chmod(0o755)  # QEMU runs as libvirt-qemu and must traverse lib/
        # libvirt-qemu's home (/var/lib/libvirt/qemu) is made by libvirtd with the right owner.

        ns = self._spawn("virtlogd", ["unshare", "--mount", "--propagation", "private",
                                      "sh", "-c", namespace_script(self.base, hidden_paths())])
        _wait(lambda: _answers_unix(f"/proc/{ns}/root/run/libvirt/virtlogd-sock"), ns, deadline, "virtlogd")

        (self.base / "etc" / "qemu.conf").write_text(QEMU_CONF)
        for _ in range(3):  # the port is free when picked; another process may take it first
            self.port = _free_port()
            (self.base / "etc" / "libvirtd.conf").write_text(libvirtd_conf(self.port))
            pid = self._spawn("libvirtd", ["nsenter", f"--mount=/proc/{ns}/ns/mnt",
                                           shutil.which("libvirtd") or "/usr/sbin/libvirtd",
                                           "--listen", "-f", "/etc/libvirt/libvirtd.conf"])
            try:
                _wait(lambda: _answers_tcp(self.port), pid, deadline, "libvirtd")
                break
            except H2KError:
                if time.monotonic() >= deadline:
                    raise
                self._stop_one("libvirtd")
        else:
            raise H2KError(f"libvirtd could not listen on a loopback port (see {self.base / 'log'})")
        self.uri = f"qemu+tcp://127.0.0.1:{self.port}/system"
        return self.uri

    def _spawn(self, name: str, argv: list[str]) -> int:
        # Foreground children (no -d): we own them, know their pids and reap them.
        assert self.base is not None
        log = open(self.base / f"{name}.out", "wb")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        self._procs[name] = proc
        self.started_pids[name] = proc.pid
        return proc.pid

    def _stop_one(self, name: str, timeout: float = 15.0) -> None:
        proc = self._procs.pop(name, None)
        self.started_pids.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def host_path(self, path: str) -> Path:
        """A path as the daemons see it (e.g. in their private /run), reached through /proc."""
        pid = self.started_pids.get("virtlogd")
        if pid is None:
            raise H2KError("the private libvirtd is not running")
        return Path(f"/proc/{pid}/root{path}")

    def child_pids(self) -> list[int]:
        """Processes the daemon started and still runs (QEMU, swtpm), from its own pidfiles."""
        out = []
        try:
            files = list(self.host_path("/run/libvirt/qemu").rglob("*.pid"))
        except (OSError, H2KError):
            return []
        for f in files:
            try:
                pid = int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            if _pid_alive(pid):
                out.append(pid)
        return out

    def stop(self, timeout: float = 15.0) -> None:
        """Destroy running domains, SIGTERM the daemons (libvirtd first), end what they left, remove the dirs."""
        if self.uri and "libvirtd" in self._procs:
            self._destroy_domains()
        # A QEMU or swtpm the daemon did not get to end would outlive it: ended by its pid
        # (read from the daemon's pidfiles before the daemons, and their /run, go away).
        left = self.child_pids()
        for name in STOP_ORDER:
            self._stop_one(name, timeout)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._own_base and self.base is not None:
            self._keep_logs()
            shutil.rmtree(self.base, ignore_errors=True)
        self.uri = ""

    def _destroy_domains(self, timeout: float = 30.0) -> None:
        import libvirt

        def destroy_all() -> None:
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError:
                return
            try:
                for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                    try:
                        dom.destroy()
                    except libvirt.libvirtError:
                        pass
            finally:
                conn.close()

        # A wedged daemon never answers: do not let it keep the stop (and the test run) waiting.
        t = threading.Thread(target=destroy_all, name="libvirtd-destroy-all", daemon=True)
        t.start()
        t.join(timeout)

    def _keep_logs(self) -> None:
        """With H2K_LIBVIRTD_LOGS=DIR, the daemons' logs (and QEMU's) are copied there before removal."""
        dest = os.environ.get("H2K_LIBVIRTD_LOGS")
        if not dest or self.base is None:
            return
        target = Path(dest) / f"libvirtd-{self.port}-{int(time.time())}"
        shutil.copytree(self.base / "log", target, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        for out in self.base.glob("*.out"):
            shutil.copy(out, target / out.name)

    def __enter__(self) -> "LibvirtDaemons":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
