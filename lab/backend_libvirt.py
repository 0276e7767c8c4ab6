"""The libvirt backend: boot a profile as a transient libvirt domain, same signals, same verdicts.

How each signal of the direct backend is obtained here:

- QMP events: libvirt owns QEMU's monitor, so no QMP socket is ours. libvirt-qemu's
  monitor-event API (``virConnectDomainQemuMonitorEventRegister``) hands us every raw
  QMP event (``GUEST_PANICKED`` with its hyper-v ``info``, ``SHUTDOWN`` with reason
  ``guest-reset``, ``VSERPORT_CHANGE``...). They are written to ``qmp.jsonl`` in the
  direct backend's shape and fed to the same ``SignalBus``/``Scorer``.
- Console: COM1 is a UNIX socket (``<serial type='unix'>``) read by the same
  ``SocketWatcher``; ``serial.log`` is written by virtlogd (``<log file>``).
  libvirt has no debug-port device, so SeaBIOS messages come over COM1
  (``<bios useserial='yes'/>``) and match the same "any" firmware patterns.
- Guest agent: libvirt itself connects to the ``org.qemu.guest_agent.0`` channel,
  so nobody else can. A small local bridge socket turns the JSON-line protocol the
  lab's ``AgentChecker`` speaks into ``virDomainQemuAgentCommand`` calls, so the
  very same checker runs unchanged.
- The domain is created paused (watchers attach first) with
  ``VIR_DOMAIN_START_AUTODESTROY``: if the lab dies without cleaning up, libvirt
  destroys the domain when our connection goes away. On every exit path
  (verdict, timeout, exception, SIGINT/SIGTERM) the domain is destroyed and the
  per-boot directory (overlay, sockets, NVRAM copy) removed.

Differences from the direct backend: a reboot with ``on_reboot=destroy`` ends the
domain at once, so there is no screendump for a reboot loop; there is no
``firmware.log`` (no isa-debugcon).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from h2k import accel as accelmod
from h2k import libvirt_xml
from h2k.errors import H2KError, InputError
from h2k.profile import MachineProfile
from lab import backend_qemu
from lab.console import ConsoleScanner, SocketWatcher
from lab.scoring import AgentChecker, Decision, Scorer, Signal, SignalBus, finish_evidence, score
from lab.verdict import BootResult, Expect

try:  # python3-libvirt from Debian (the venv has --system-site-packages)
    import libvirt
    import libvirt_qemu
except ImportError as _exc:  # pragma: no cover - reported by lab.boot as "backend not available"
    raise ImportError(f"python3-libvirt is not installed ({_exc})") from _exc

DEFAULT_URI = "qemu:///system"
LIBVIRT_QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
ARTIFACTS = ("serial.log", "qmp.jsonl", "qemu.log", "screen.png", "agent.jsonl", "verdict.json", "domain.xml")

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


# Domains this process created and has not destroyed yet: destroyed at exit.
_live: dict[str, "libvirt.virDomain"] = {}
_live_lock = threading.Lock()


def _destroy_all() -> None:
    with _live_lock:
        doms = list(_live.items())
        _live.clear()
    for _, dom in doms:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass


atexit.register(_destroy_all)


def _quiet_libvirt_errors() -> None:
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda ctx, err: None, None)


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
# One boot


@dataclass
class LibvirtBootOptions:
    timeout: float
    outdir: Path
    expect: Expect = field(default_factory=Expect)
    connect: str | None = None
    vars_file: Path | None = None  # UEFI NVRAM to use (made from the template if missing) and keep
    shutdown_on_pass: bool = False
    shutdown_timeout: float = 90.0
    screendump: bool = True


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
        self.workdir: Path | None = None
        self.watchers: list[SocketWatcher] = []
        self.bridge: AgentBridge | None = None
        self.agent_checker: AgentChecker | None = None
        self._callbacks: list[tuple[str, int]] = []
        self._qmp_log = None
        self._qmp_lock = threading.Lock()
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
                decision = Decision("incomplete", f"lab error (libvirt): {_one_line(exc)}", "lab")
            t_decided = time.monotonic()
            if decision.signal_t is not None:
                self.timings["signal_to_verdict"] = round(t_decided - decision.signal_t, 4)
            self.timings["guest_seconds"] = round(t_decided - self.timings.pop("_t_cont", t_decided), 3)
            extra = self._evidence(decision)
        finally:
            t0 = time.monotonic()
            self._teardown()
            self.timings["teardown"] = round(time.monotonic() - t0, 4)
        agent_data = dict(self.agent_checker.result) if self.agent_checker else {}
        if decision.data.get("machine_info"):
            agent_data.setdefault("machine_info", decision.data["machine_info"])
        result = BootResult(
            verdict=extra.get("verdict") or decision.verdict,
            reason=decision.reason + extra.get("reason_suffix", ""),
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
        ensure_event_loop()
        _quiet_libvirt_errors()
        self.workdir = backend_qemu.make_workdir()
        wd = self.workdir
        disk = None
        if self.image is not None:
            disk = backend_qemu.create_overlay(self.image, wd / "overlay.qcow2")
        self.timings["overlay"] = round(time.monotonic() - t0, 4)
        nvram = None
        if self.profile.uefi:
            # libvirt copies the VARS template to this path when it does not exist yet.
            nvram = Path(self.opts.vars_file).resolve() if self.opts.vars_file else wd / "OVMF_VARS.fd"
            nvram.parent.mkdir(parents=True, exist_ok=True)
        files = libvirt_xml.DomainFiles(
            disk=str(disk) if disk else None,
            disk_format="qcow2",
            serial_socket=str(wd / "console.sock") if self.profile.serial_console else None,
            serial_log=str(self.outdir / "serial.log") if self.profile.serial_console else None,
            agent_socket=str(wd / "qga.sock") if self.profile.guest_agent else None,
            nvram=str(nvram) if nvram else None,
        )
        profile = _named(self.profile, self.tag)
        xml = libvirt_xml.domain_xml(profile, files, libvirt_xml.XmlOptions(
            domain_type=accel.libvirt_domain_type(), lab=True, qemu_as_root=True))
        (self.outdir / "domain.xml").write_text(xml)

        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise H2KError(f"cannot connect to libvirt at {self.uri}: {_one_line(exc)}") from None
        self._qmp_log = open(self.outdir / "qmp.jsonl", "a", buffering=1)
        # Register before the domain exists so no event is missed; filter by name.
        cid = libvirt_qemu.qemuMonitorEventRegister(self.conn, None, None, self._on_qmp_event, None, 0)
        self._callbacks.append(("qemu", cid))
        cid = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        self._callbacks.append(("lifecycle", cid))

        flags = libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY
        dom = self.conn.createXML(xml, flags)
        with _live_lock:
            _live[self.tag] = dom
        self.dom = dom
        self.timings["start_to_qmp"] = round(time.monotonic() - t0, 4)
        if self.profile.serial_console:
            w = SocketWatcher(wd / "console.sock", ConsoleScanner(self.opts.expect, "console"),
                              self.bus.console_listener("console"), name="console")
            w.start()
            self.watchers.append(w)
        if self.profile.guest_agent:
            self.bridge = AgentBridge(wd / "agent.sock", dom)
            self.bridge.start()
        dom.resume()
        self.timings["_t_cont"] = time.monotonic()
        self.timings["lab_start"] = round(time.monotonic() - t0, 4)

    # -- events (called on the libvirt event-loop thread) ---------------------
    def _on_qmp_event(self, conn: Any, dom: Any, event: str, seconds: int, micros: int, details: str | None, opaque: Any) -> None:
        if dom is None or dom.name() != self.tag:
            return
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
        if dom is None or dom.name() != self.tag:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and not self._tearing_down.is_set():
            # Same signal as the direct backend's "QEMU exited"; a reboot or panic has
            # already been scored from its QMP event, which libvirt delivers first.
            self.bus.put(Signal("process", "exited", {"returncode": f"libvirt stopped, detail {detail}",
                                                      "log_tail": self._qemu_log_tail()}))
        with self._shutdown_seen:
            self._shutdown_seen.notify_all()

    def _log_qmp(self, direction: str, msg: dict[str, Any]) -> None:
        with self._qmp_lock:
            if self._qmp_log is not None:
                self._qmp_log.write(json.dumps({"t": round(time.time(), 6), "dir": direction, "msg": msg}) + "\n")

    def _qemu_log_tail(self, n: int = 2000) -> str:
        try:
            with open(LIBVIRT_QEMU_LOG_DIR / f"{self.tag}.log", "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - n))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    # -- watch ---------------------------------------------------------------
    def _watch(self, deadline: float) -> Decision:
        expect = self.opts.expect
        scorer = Scorer(expect, console_expected=self.profile.serial_console)
        if scorer.agent_expected:
            if not self.profile.guest_agent:
                return Decision("incomplete", "the expectation needs the guest agent but the profile has no agent channel", "lab")
            assert self.workdir is not None
            self.agent_checker = AgentChecker(str(self.workdir / "agent.sock"), expect, self.bus, deadline,
                                              port_open=scorer.agent_port_open, log_path=self.outdir / "agent.jsonl")
            self.agent_checker.start()
        return score(self.bus, scorer, deadline)

    # -- evidence and shutdown -----------------------------------------------
    def _qmp_command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command through libvirt-qemu (logged like the direct backend's)."""
        assert self.dom is not None
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._log_qmp("out", msg)
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.dom, json.dumps(msg), 0))
        self._log_qmp("in", reply)
        return reply

    def _active(self) -> bool:
        try:
            return self.dom is not None and bool(self.dom.isActive())
        except libvirt.libvirtError:
            return False

    def _evidence(self, decision: Decision) -> dict[str, Any]:
        def screendump() -> None:
            try:
                self._qmp_command("screendump", {"filename": str(self.outdir / "screen.png"), "format": "png"})
            except (libvirt.libvirtError, ValueError):
                pass

        return finish_evidence(decision, self.timings,
                               screendump=screendump if self.opts.screendump and self._active() else None,
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

    def _teardown(self) -> None:
        self._tearing_down.set()
        if self.agent_checker is not None:
            self.agent_checker.stop()
            if self.agent_checker.client is not None:
                self.agent_checker.client.close()
        if self.bridge is not None:
            self.bridge.stop()
        if self.dom is not None:
            try:
                self.dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone (reboot, poweroff)
            with _live_lock:
                _live.pop(self.tag, None)
        for w in self.watchers:
            w.stop()
        if self.conn is not None:
            for kind, cid in self._callbacks:
                try:
                    if kind == "qemu":
                        libvirt_qemu.qemuMonitorEventDeregister(self.conn, cid)
                    else:
                        self.conn.domainEventDeregisterAny(cid)
                except libvirt.libvirtError:
                    pass
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass
        with self._qmp_lock:
            if self._qmp_log is not None:
                self._qmp_log.close()
                self._qmp_log = None
        # libvirt's per-domain QEMU log becomes the boot's qemu.log.
        src = LIBVIRT_QEMU_LOG_DIR / f"{self.tag}.log"
        if src.exists():
            try:
                shutil.copyfile(src, self.outdir / "qemu.log")
                src.unlink()
            except OSError:
                pass
        if self.workdir is not None:
            backend_qemu.remove_workdir(self.workdir)


def _named(profile: MachineProfile, name: str) -> MachineProfile:
    from dataclasses import replace

    return replace(profile, name=name)


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
) -> BootResult:
    """Boot ``image`` (None: direct kernel boot) as a transient libvirt domain and score it."""
    opts = LibvirtBootOptions(timeout=timeout, outdir=Path(outdir), expect=expect or Expect(), connect=connect,
                              vars_file=vars_file, shutdown_on_pass=shutdown_on_pass)
    with backend_qemu.interrupt_guard():
        return LibvirtBoot(image, profile, opts).run()
