"""The libvirt backend: boot a profile as a transient domain on a libvirt host, same signals, same verdicts.

The host is treated as remote whatever the URI (``qemu:///system``,
``qemu+ssh://host/system``, ``qemu+tcp://...``): the lab and the daemon share no
file and no socket, everything goes through libvirt's API.

- Files: the disk (flattened to one qcow2 if it has a backing chain), CD-ROMs, a
  direct-boot kernel/initramfs and a kept UEFI NVRAM are uploaded into volumes of the
  host's ``h2k`` storage pool (``lab.libvirt_storage``); the domain XML names only
  those volumes and the host's own files (its OVMF, picked by libvirt's firmware
  autoselection). The NVRAM is downloaded back after the boot; every volume is deleted.
  A two-phase run uploads its disk once (``phase_volume``): both phases boot and write
  that volume, so the final phase sees what the bootstrap phase wrote, and it is
  deleted when the run ends.
- QMP events: libvirt owns QEMU's monitor. libvirt-qemu's monitor-event API
  (``virConnectDomainQemuMonitorEventRegister``) hands us every raw QMP event
  (``GUEST_PANICKED`` with its hyper-v ``info``, ``SHUTDOWN`` with reason
  ``guest-reset``, ``VSERPORT_CHANGE``...). They are written to ``qmp.jsonl`` in the
  direct backend's shape and fed to the same ``SignalBus``/``Scorer``.
- Console: COM1 is a pty on the host, read through ``virDomainOpenConsole`` on a
  libvirt stream (``lab.libvirt_streams.ConsoleStream``), teed to the local
  ``serial.log`` and scanned by the same ``ConsoleScanner``. libvirt has no
  debug-port device, so SeaBIOS messages come over COM1 (``<bios useserial='yes'/>``).
- Guest agent: libvirt itself holds the ``org.qemu.guest_agent.0`` channel. A small
  bridge socket in the lab's own temp dir turns the JSON-line protocol the lab's
  ``AgentChecker`` speaks into ``virDomainQemuAgentCommand`` calls, so the very same
  checker runs unchanged.
- Screen: ``virDomainScreenshot`` over a stream (``screen.png``).
- QEMU runs as the host's QEMU user (no ``<seclabel>`` asks for root); libvirt's DAC
  driver gives it the volumes for the boot's duration.

The domain is created paused (console and events attach first) with
``VIR_DOMAIN_START_AUTODESTROY``: if the lab dies without cleaning up, libvirt
destroys the domain when our connection goes away. On every exit path (verdict,
timeout, exception, SIGINT/SIGTERM) the domain is destroyed and its volumes and the
local temp dir removed (a SIGKILLed lab leaves its volumes in the pool).

Differences from the direct backend: a reboot with ``on_reboot=destroy`` ends the
domain at once, so there is no screendump for a reboot loop; there is no
``firmware.log`` (no isa-debugcon); QEMU's own log stays on the host
(``/var/log/libvirt/qemu/<domain>.log``): the local ``qemu.log`` records what libvirt
reported about the QEMU process (lifecycle events, errors).
"""

from __future__ import annotations

import atexit
import json
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from h2k import accel as accelmod
from h2k import libvirt_xml
from h2k.errors import H2KError, InputError
from h2k.profile import MachineProfile
from lab import backend_qemu
from lab.console import ConsoleScanner
from lab.scoring import AgentChecker, Decision, Scorer, Signal, SignalBus, finish_evidence, score
from lab.verdict import BootResult, Expect

try:  # python3-libvirt from Debian (the venv has --system-site-packages)
    import libvirt
    import libvirt_qemu
except ImportError as _exc:  # pragma: no cover - reported by lab.boot as "backend not available"
    raise ImportError(f"python3-libvirt is not installed ({_exc})") from _exc

from lab import libvirt_storage  # noqa: E402  (needs libvirt)
from lab.libvirt_streams import SCREEN_NAMES, ConsoleStream, screenshot  # noqa: E402

DEFAULT_URI = "qemu:///system"
ARTIFACTS = ("serial.log", "qmp.jsonl", "qemu.log", "screen.png", "screen.ppm", "agent.jsonl", "verdict.json",
             "domain.xml", "domain.live.xml")

# --------------------------------------------------------------------------------------
# One event loop per process (libvirt delivers events only to connections opened after it).

_loop_lock = threading.Lock()
_loop_started = False


def ensure_event_loop() -> None:
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


# Boots (and two-phase disks) of this process not torn down yet: their domains and volumes go at exit.
_live: dict[str, "LibvirtBoot | _PhaseVolumeOwner"] = {}
_live_lock = threading.Lock()


def _cleanup_all() -> None:
    with _live_lock:
        boots = list(_live.values())
        _live.clear()
    for b in boots:
        b.release_host_side()


atexit.register(_cleanup_all)


def _quiet_libvirt_errors() -> None:
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda ctx, err: None, None)


def _constant_names(prefix: str, one_word: bool = False) -> dict[int, str]:
    names = {n[len(prefix):]: getattr(libvirt, n) for n in dir(libvirt) if n.startswith(prefix)}
    return {v: k.lower() for k, v in names.items() if isinstance(v, int) and not (one_word and "_" in k)}


_EVENTS = _constant_names("VIR_DOMAIN_EVENT_", one_word=True)
_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: _constant_names("VIR_DOMAIN_EVENT_STARTED_"),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: _constant_names("VIR_DOMAIN_EVENT_SUSPENDED_"),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: _constant_names("VIR_DOMAIN_EVENT_RESUMED_"),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: _constant_names("VIR_DOMAIN_EVENT_STOPPED_"),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: _constant_names("VIR_DOMAIN_EVENT_SHUTDOWN_"),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: _constant_names("VIR_DOMAIN_EVENT_CRASHED_"),
}


def lifecycle_text(event: int, detail: int) -> str:
    """``stopped (destroyed)`` for libvirt's lifecycle event numbers."""
    name = _EVENTS.get(event, f"event {event}")
    return f"{name} ({_DETAILS.get(event, {}).get(detail, f'detail {detail}')})"


# --------------------------------------------------------------------------------------
# The guest-agent bridge


class AgentBridge:
    """A UNIX socket speaking the guest agent's JSON-line protocol, backed by
    ``virDomainQemuAgentCommand`` (libvirt holds the real channel).

    ``guest-sync(-delimited)`` is answered with the caller's id after a real
    ``guest-ping`` reaches the agent (libvirt syncs the channel itself); no answer
    if the agent is not up, exactly like a silent channel. ``guest-shutdown`` goes
    through ``virDomainShutdownFlags(GUEST_AGENT)`` and, as with the agent, gets no reply.
    """

    def __init__(self, path: Path, dom: "libvirt.virDomain | None", command_timeout: int = 15,
                 agent_command: "Callable[[str, int], str] | None" = None,
                 shutdown: "Callable[[str], None] | None" = None) -> None:
        self.path = Path(path)
        self.dom = dom
        self.command_timeout = command_timeout
        # The two libvirt calls, injectable so the protocol mapping is unit-testable.
        self._agent = agent_command or (lambda text, timeout: libvirt_qemu.qemuAgentCommand(dom, text, timeout, 0))
        self._shutdown = shutdown or self._libvirt_shutdown
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lsock.bind(str(self.path))
        self._lsock.listen(2)
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="agent-bridge", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for s in [self._lsock, *self._conns]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._thread.join(timeout=3)

    def _libvirt_shutdown(self, mode: str) -> None:
        assert self.dom is not None
        if mode == "reboot":
            self.dom.reboot(libvirt.VIR_DOMAIN_REBOOT_GUEST_AGENT)
        else:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._lsock.accept()
            except OSError:
                return
            self._conns.append(conn)
            self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                reply = self.answer(line.replace(b"\xff", b"").strip())
                if reply is not None:
                    try:
                        conn.sendall(reply)
                    except OSError:
                        return

    def answer(self, line: bytes) -> bytes | None:
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            return _agent_error("JSON parse error")
        cmd = msg.get("execute")
        try:
            if cmd in ("guest-sync-delimited", "guest-sync"):
                self._agent(json.dumps({"execute": "guest-ping"}), 3)
                prefix = b"\xff" if cmd == "guest-sync-delimited" else b""
                return prefix + json.dumps({"return": msg.get("arguments", {}).get("id")}).encode() + b"\n"
            if cmd == "guest-shutdown":
                self._shutdown((msg.get("arguments") or {}).get("mode", "powerdown"))
                return None
            out = self._agent(line.decode(), self.command_timeout)
            return (out or "{}").encode() + b"\n"
        except libvirt.libvirtError as exc:
            if cmd in ("guest-sync-delimited", "guest-sync"):
                return None  # the agent is not there (yet): stay silent, the client retries
            return _agent_error(str(exc))


def _agent_error(desc: str) -> bytes:
    return json.dumps({"error": {"class": "GenericError", "desc": desc}}).encode() + b"\n"


# --------------------------------------------------------------------------------------
# The disk


def upload_disk(vols: libvirt_storage.BootVolumes, image: Path, workdir: Path,
                note: Callable[[str], None]) -> tuple[str, str]:
    """Upload ``image`` as a volume (flattened to one qcow2 in ``workdir`` first if it is a chain);
    returns the volume's name and the format of what it holds."""
    src, fmt = image, "qcow2"
    shape = libvirt_storage.image_shape(src)
    if libvirt_storage.needs_flattening(shape):
        src = libvirt_storage.flatten(src, workdir / "disk.qcow2")
        note(f"flattened {image} ({shape.format}, {shape.chain} image(s) in its chain) to one qcow2 for the upload")
    else:
        fmt = shape.format
    volume = vols.upload(src, f"disk.{fmt}")
    if src.parent == workdir:
        src.unlink()  # uploaded: the local copy is not needed any more
    return volume, fmt


@dataclass(frozen=True)
class PhaseVolume:
    """The disk of a two-phase run on the libvirt host: one volume holding a copy of the user's
    image, which each phase boots (and writes) in turn."""

    volume: str
    format: str
    pool: str
    how: str  # how it got there (flattened?, uploaded from where, bytes), for each phase's log
    lab_notes: list[str] = field(default_factory=list)  # filled at the end: what could not be removed


class _PhaseVolumeOwner:
    """Uploads the run's disk and deletes it (idempotent; also at interpreter exit)."""

    def __init__(self, image: Path, uri: str) -> None:
        self.image = Path(image)
        self.uri = uri
        self.tag = f"h2k-{uuid.uuid4().hex[:12]}"
        self.conn: "libvirt.virConnect | None" = None
        self.volumes: libvirt_storage.BootVolumes | None = None
        self.workdir: Path | None = None
        self.left: list[str] = []  # what could not be removed

    def upload(self) -> PhaseVolume:
        _quiet_libvirt_errors()
        self.workdir = backend_qemu.make_workdir()  # a flattened copy, if the image is a chain
        with _live_lock:
            _live[self.tag] = self
        self.conn = _connect(self.uri)
        notes: list[str] = []
        try:
            self.volumes = libvirt_storage.BootVolumes(self.conn, self.tag)
            volume, fmt = upload_disk(self.volumes, self.image, self.workdir, notes.append)
        except libvirt.libvirtError as exc:
            raise H2KError(f"two-phase boot: cannot upload {self.image} to {self.uri}: {_one_line(exc)}") from None
        notes += [f"uploaded {local} ({size} bytes)" for local, _, size in self.volumes.uploads]
        return PhaseVolume(volume, fmt, self.volumes.pool.name(), "; ".join(notes))

    def release_host_side(self) -> None:
        with _live_lock:
            _live.pop(self.tag, None)
        if self.volumes is not None:
            left = self.volumes.delete_all()
            if left:
                self.left.append(f"volumes left in the host's pool: {', '.join(left)}")
            self.volumes = None
        if self.conn is not None:
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass
            self.conn = None
        if self.workdir is not None:
            backend_qemu.remove_workdir(self.workdir)
            self.workdir = None


@contextmanager
def phase_volume(image: Path, *, connect: str | None = None) -> Iterator[PhaseVolume]:
    """Upload ``image`` once for the phases of a two-phase run; delete the volume when the run
    ends, however it ends (a SIGKILLed lab leaves it in the pool, like a boot's volumes)."""
    owner = _PhaseVolumeOwner(image, connect or DEFAULT_URI)
    disk = None
    try:
        disk = owner.upload()
        yield disk
    finally:
        owner.release_host_side()
        if disk is not None:
            disk.lab_notes.extend(owner.left)


# --------------------------------------------------------------------------------------
# One boot


@dataclass
class LibvirtBootOptions:
    timeout: float
    outdir: Path
    expect: Expect = field(default_factory=Expect)
    connect: str | None = None
    vars_file: Path | None = None  # UEFI NVRAM to use (made from the host's template if missing) and keep
    shutdown_on_pass: bool = False
    phase_disk: "PhaseVolume | None" = None  # a phase of a two-phase run: boot (and write) this volume
    shutdown_timeout: float = 90.0
    screendump: bool = True


@dataclass(frozen=True)
class HostSide:
    """Where the boot's files are on the libvirt host, as the domain XML names them."""

    profile: MachineProfile  # kernel, initrd and CD-ROMs as host paths
    files: libvirt_xml.DomainFiles
    nvram_volume: str | None


class LibvirtBoot:
    def __init__(self, image: Path | None, profile: MachineProfile, opts: LibvirtBootOptions) -> None:
        self.image = image
        self.profile = profile
        self.opts = opts
        self.uri = opts.connect or DEFAULT_URI
        self.tag = f"h2k-{uuid.uuid4().hex[:12]}"
        self.outdir = Path(opts.outdir).resolve()
        self.timings: dict[str, float] = {}
        self.bus = SignalBus()
        self.conn: "libvirt.virConnect | None" = None
        self.dom: "libvirt.virDomain | None" = None
        self.volumes: libvirt_storage.BootVolumes | None = None
        self.host: HostSide | None = None
        self.workdir: Path | None = None
        self.console: ConsoleStream | None = None
        self.bridge: AgentBridge | None = None
        self.agent_checker: AgentChecker | None = None
        self.lab_notes: list[str] = []  # teardown problems, appended to the reason
        self._callbacks: list[tuple[str, int]] = []
        self._qmp_log = None
        self._qmp_lock = threading.Lock()
        self._events: list[str] = []  # libvirt's account of the QEMU process -> qemu.log
        self._tearing_down = threading.Event()
        self._shutdowns: list[dict[str, Any]] = []
        self._shutdown_seen = threading.Condition()

    def artifacts(self) -> dict[str, str]:
        return {n: str(self.outdir / n) for n in ARTIFACTS if (self.outdir / n).exists() or n == "verdict.json"}

    def run(self) -> BootResult:
        t_start = time.monotonic()
        deadline = t_start + self.opts.timeout
        self.outdir.mkdir(parents=True, exist_ok=True)
        for stale in ARTIFACTS:
            try:
                (self.outdir / stale).unlink()
            except FileNotFoundError:
                pass
        accel = accelmod.decide(announce=False)
        decision: Decision | None = None
        extra: dict[str, Any] = {}
        try:
            try:
                self._start(accel)
                decision = self._watch(deadline)
            except (libvirt.libvirtError, OSError, H2KError) as exc:
                if isinstance(exc, InputError):
                    raise
                self._note_event(f"lab error: {_one_line(exc)}")
                decision = Decision("incomplete", f"lab error (libvirt): {_one_line(exc)}", "lab")
            t_decided = time.monotonic()
            if decision.signal_t is not None:
                self.timings["signal_to_verdict"] = round(t_decided - decision.signal_t, 4)
            self.timings["guest_seconds"] = round(t_decided - self.timings.pop("_t_cont", t_decided), 3)
            extra = self._evidence(decision)
        finally:
            t0 = time.monotonic()
            self.teardown()
            self.timings["teardown"] = round(time.monotonic() - t0, 4)
        agent_data = dict(self.agent_checker.result) if self.agent_checker else {}
        if decision.data.get("machine_info"):
            agent_data.setdefault("machine_info", decision.data["machine_info"])
        notes = "".join(f"; lab: {n}" for n in self.lab_notes)
        result = BootResult(
            verdict=extra.get("verdict") or decision.verdict,
            reason=decision.reason + extra.get("reason_suffix", "") + notes,
            stop_code=decision.stop_code,
            stop_name=decision.stop_name,
            seconds=round(time.monotonic() - t_start, 3),
            artifacts=self.artifacts(),
            agent=agent_data,
            signal=decision.signal,
            evidence=list(decision.evidence),
            known_issues=decision.known_issues,
            profile=self.profile.to_dict(),
            backend="libvirt",
            accel=accel.accel,
            timings=self.timings,
        )
        result.write(self.outdir)
        result.artifacts = self.artifacts()
        return result

    # -- start ---------------------------------------------------------------
    def _start(self, accel: accelmod.AccelDecision) -> None:
        t0 = time.monotonic()
        dom = self.create_paused(accel)
        # Paused: nothing has run yet, so registering now misses no event or console byte.
        cid = libvirt_qemu.qemuMonitorEventRegister(self.conn, dom, None, self._on_qmp_event, None, 0)
        self._callbacks.append(("qemu", cid))
        cid = self.conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        self._callbacks.append(("lifecycle", cid))
        self.timings["start_to_qmp"] = round(time.monotonic() - t0, 4)
        if self.profile.serial_console:
            self.console = ConsoleStream(self.conn, dom, ConsoleScanner(self.opts.expect, "console"),
                                         self.bus.console_listener("console"), self.outdir / "serial.log")
            self.console.start()
        if self.profile.guest_agent:
            assert self.workdir is not None
            self.bridge = AgentBridge(self.workdir / "agent.sock", dom)
            self.bridge.start()
        dom.resume()
        self.timings["_t_cont"] = time.monotonic()
        self.timings["lab_start"] = round(time.monotonic() - t0, 4)

    def create_paused(self, accel: accelmod.AccelDecision) -> "libvirt.virDomain":
        """Connect, upload the boot's files and create the domain paused (no guest code has run)."""
        t0 = time.monotonic()
        self.outdir.mkdir(parents=True, exist_ok=True)
        ensure_event_loop()
        _quiet_libvirt_errors()
        self.workdir = backend_qemu.make_workdir()  # the lab's side: agent bridge socket, a flattened disk
        with _live_lock:
            _live[self.tag] = self
        self.conn = _connect(self.uri)
        self.volumes = libvirt_storage.BootVolumes(self.conn, self.tag)
        self.host = self._upload(self.volumes)
        for local, name, size in self.volumes.uploads:
            self._note_event(f"uploaded {local} ({size} bytes) as volume {name}")
        self.timings["upload"] = round(time.monotonic() - t0, 4)
        self.timings["upload_mb"] = round(self.volumes.bytes_sent / 2**20, 1)

        xml = libvirt_xml.domain_xml(self.host.profile, self.host.files, libvirt_xml.XmlOptions(
            domain_type=self._domain_type(accel), lab=True, firmware_autoselect=True))
        (self.outdir / "domain.xml").write_text(xml)
        self._qmp_log = open(self.outdir / "qmp.jsonl", "a", buffering=1)
        flags = libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY
        dom = self.conn.createXML(xml, flags)
        self.dom = dom
        self._note_event("created paused")
        # What the host runs, with the paths and QEMU user it chose.
        (self.outdir / "domain.live.xml").write_text(dom.XMLDesc(0))
        return dom

    def _domain_type(self, accel: accelmod.AccelDecision) -> str:
        """KVM only when this machine's accel decision says so and the host offers it too."""
        assert self.conn is not None
        wanted = accel.libvirt_domain_type()
        if wanted != "kvm":
            return wanted
        try:
            self.conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
        except libvirt.libvirtError as exc:
            self._note_event(f"the host offers no KVM ({_one_line(exc)}): domain type qemu (TCG)")
            return "qemu"
        return "kvm"

    def _upload(self, vols: libvirt_storage.BootVolumes) -> HostSide:
        """Every file the domain reads, into the host's pool; the XML then names only host paths."""
        assert self.workdir is not None
        p = self.profile
        disk, fmt, disk_pool = None, "qcow2", vols.pool.name()
        if self.opts.phase_disk is not None:
            shared = self.opts.phase_disk
            disk, fmt, disk_pool = shared.volume, shared.format, shared.pool
            self._note_event(f"disk: volume {disk} of the two-phase run, written in place by each phase "
                             f"({shared.how} once, before the bootstrap phase)")
        elif self.image is not None:
            disk, fmt = upload_disk(vols, Path(self.image), self.workdir, self._note_event)
        kernel = vols.path(vols.upload(Path(p.kernel), "kernel")) if p.kernel else None
        initrd = vols.path(vols.upload(Path(p.initrd), "initrd")) if p.initrd else None
        cdroms = [vols.path(vols.upload(Path(iso), f"cd{i}.iso")) for i, iso in enumerate(p.cdroms)]
        nvram = None
        if p.uefi:
            keep = self.opts.vars_file
            nvram = vols.upload(Path(keep), "VARS.fd") if keep and Path(keep).exists() else vols.expect("VARS.fd")
        profile = replace(p, name=self.tag, kernel=kernel, initrd=initrd, cdroms=cdroms)
        files = libvirt_xml.DomainFiles(disk=disk, disk_format=fmt, disk_pool=disk_pool if disk else None,
                                        nvram=vols.path(nvram) if nvram else None)
        return HostSide(profile, files, nvram)

    # -- events (called on the libvirt event-loop thread) ---------------------
    def _on_qmp_event(self, conn: Any, dom: Any, event: str, seconds: int, micros: int, details: str | None, opaque: Any) -> None:
        ev: dict[str, Any] = {"event": event}
        if details:
            try:
                ev["data"] = json.loads(details)
            except ValueError:
                ev["data"] = {"raw": details}
        ev["timestamp"] = {"seconds": seconds, "microseconds": micros}
        self._log_qmp("in", ev)
        if event == "SHUTDOWN":
            with self._shutdown_seen:
                self._shutdowns.append(ev)
                self._shutdown_seen.notify_all()
        self.bus.qmp_listener(ev)

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        text = lifecycle_text(event, detail)
        self._note_event(text)
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and not self._tearing_down.is_set():
            # Same signal as the direct backend's "QEMU exited"; a reboot or panic has
            # already been scored from its QMP event, which libvirt delivers first.
            self.bus.put(Signal("process", "exited", {"returncode": f"libvirt: {text}",
                                                      "log_tail": "\n".join(self._events[-3:])}))
        with self._shutdown_seen:
            self._shutdown_seen.notify_all()

    def _note_event(self, text: str) -> None:
        self._events.append(f"{time.strftime('%H:%M:%S')} {self.tag}: {text}")

    def _log_qmp(self, direction: str, msg: dict[str, Any]) -> None:
        with self._qmp_lock:
            if self._qmp_log is not None:
                self._qmp_log.write(json.dumps({"t": round(time.time(), 6), "dir": direction, "msg": msg}) + "\n")

    # -- watch ---------------------------------------------------------------
    def _watch(self, deadline: float) -> Decision:
        expect = self.opts.expect
        scorer = Scorer(expect, console_expected=self.profile.serial_console,
                        agent_expected=None if self.profile.guest_agent else False)
        if scorer.impossible:
            return Decision("incomplete", scorer.impossible, "lab")
        if scorer.agent_expected:
            assert self.workdir is not None
            self.agent_checker = AgentChecker(str(self.workdir / "agent.sock"), expect, self.bus, deadline,
                                              port_open=scorer.agent_port_open, log_path=self.outdir / "agent.jsonl",
                                              network=scorer.want_network)
            self.agent_checker.start()
        return score(self.bus, scorer, deadline)

    # -- evidence and shutdown -----------------------------------------------
    def _active(self) -> bool:
        try:
            return self.dom is not None and bool(self.dom.isActive())
        except libvirt.libvirtError:
            return False

    def _screendump(self) -> None:
        assert self.conn is not None and self.dom is not None
        try:
            data, mime = screenshot(self.conn, self.dom)
        except libvirt.libvirtError:
            return  # evidence, not a signal
        (self.outdir / SCREEN_NAMES.get(mime, "screen.png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "screen.ppm")).write_bytes(data)

    def _evidence(self, decision: Decision) -> dict[str, Any]:
        return finish_evidence(decision, self.timings,
                               screendump=self._screendump if self.opts.screendump and self._active() else None,
                               clean_shutdown=self._clean_shutdown if self.opts.shutdown_on_pass else None)

    def _clean_shutdown(self) -> tuple[bool, str]:
        """Agent shutdown when the agent answered, else ACPI; proof: SHUTDOWN reason guest-shutdown."""
        assert self.dom is not None
        with self._shutdown_seen:
            seen = len(self._shutdowns)
        agent_up = bool(self.agent_checker and self.agent_checker.result.get("osinfo"))
        how = "guest agent shutdown" if agent_up else "ACPI power button"
        try:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT if agent_up
                                   else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        except libvirt.libvirtError as exc:
            return False, f"{how}: {_one_line(exc)}"
        end = time.monotonic() + self.opts.shutdown_timeout
        with self._shutdown_seen:
            while len(self._shutdowns) == seen and self._active():
                left = end - time.monotonic()
                if left <= 0:
                    return False, f"{how}: no SHUTDOWN within {self.opts.shutdown_timeout:.0f}s"
                self._shutdown_seen.wait(timeout=left)
            if len(self._shutdowns) == seen:
                return False, f"{how}: the domain stopped without a SHUTDOWN event"
            reason = (self._shutdowns[seen].get("data") or {}).get("reason")
        return reason == "guest-shutdown", f"{how}, SHUTDOWN reason {reason}"

    # -- teardown ------------------------------------------------------------
    def teardown(self) -> None:
        """Destroy the domain, fetch the NVRAM, delete the volumes and the local temp dir."""
        self._tearing_down.set()
        if self.agent_checker is not None:
            self.agent_checker.stop()
            if self.agent_checker.client is not None:
                self.agent_checker.client.close()
        if self.bridge is not None:
            self.bridge.stop()
        if self.console is not None:
            # Before the destroy: closing a console while the host tears its domain down can hang.
            self.console.close(domain_running=self._active())
        if self.dom is not None:
            try:
                self.dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone (reboot, poweroff)
        self._fetch_nvram()
        self.release_host_side()
        with self._qmp_lock:
            if self._qmp_log is not None:
                self._qmp_log.close()
                self._qmp_log = None
        self._write_qemu_log()
        if self.workdir is not None:
            backend_qemu.remove_workdir(self.workdir)

    def _fetch_nvram(self) -> None:
        """The NVRAM the guest wrote comes back to ``vars_file`` for the next phase."""
        if (self.dom is None or self.host is None or self.host.nvram_volume is None or self.opts.vars_file is None
                or self.volumes is None):
            return  # no UEFI, nothing to keep, or the domain never ran
        try:
            self.volumes.download(self.host.nvram_volume, Path(self.opts.vars_file))
        except (libvirt.libvirtError, OSError) as exc:
            self.lab_notes.append(f"NVRAM not fetched back from the host: {_one_line(exc)}")

    def release_host_side(self) -> None:
        """Destroy the domain, delete the volumes, close the connection (idempotent; also at exit)."""
        with _live_lock:
            _live.pop(self.tag, None)
        if self.dom is not None:
            try:
                self.dom.destroy()
            except libvirt.libvirtError:
                pass
        if self.volumes is not None:
            left = self.volumes.delete_all()
            if left:
                self.lab_notes.append(f"volumes left in the host's pool: {', '.join(left)}")
            self.volumes = None
        if self.conn is not None:
            for kind, cid in self._callbacks:
                try:
                    if kind == "qemu":
                        libvirt_qemu.qemuMonitorEventDeregister(self.conn, cid)
                    else:
                        self.conn.domainEventDeregisterAny(cid)
                except libvirt.libvirtError:
                    pass
            self._callbacks = []
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass
            self.conn = None

    def _write_qemu_log(self) -> None:
        head = (f"# libvirt backend, {self.uri}: QEMU's own log is on that host "
                f"(/var/log/libvirt/qemu/{self.tag}.log); what libvirt reported about the QEMU process:\n")
        (self.outdir / "qemu.log").write_text(head + "".join(line + "\n" for line in self._events))


def _connect(uri: str) -> "libvirt.virConnect":
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise H2KError(f"cannot connect to libvirt at {uri}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def boot(
    image: Path | None,
    profile: MachineProfile,
    *,
    timeout: float,
    outdir: Path,
    expect: Expect | None = None,
    connect: str | None = None,
    vars_file: Path | None = None,
    shutdown_on_pass: bool = False,
    phase_disk: PhaseVolume | None = None,
) -> BootResult:
    """Boot ``image`` (None: direct kernel boot) as a transient domain on the libvirt host and score it.

    ``phase_disk``: a phase of a two-phase run boots the run's volume (``phase_volume``) instead."""
    opts = LibvirtBootOptions(timeout=timeout, outdir=Path(outdir), expect=expect or Expect(), connect=connect,
                              vars_file=vars_file, shutdown_on_pass=shutdown_on_pass, phase_disk=phase_disk)
    with backend_qemu.interrupt_guard():
        return LibvirtBoot(image, profile, opts).run()
