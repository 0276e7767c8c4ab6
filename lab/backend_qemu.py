"""The direct QEMU backend: start QEMU for a profile, watch every signal, score, tear down.

Hygiene: every process the lab starts (QEMU, swtpm) runs in its own process
group with PR_SET_PDEATHSIG, is registered here, and is killed when its boot
ends, times out, or the lab is interrupted (SIGINT/SIGTERM turn into
KeyboardInterrupt so ``finally`` blocks run; atexit kills what is left). All
sockets, the overlay and the NVRAM copy live in one private temp dir per boot,
removed at the end. The image itself is never written: QEMU gets a qcow2
overlay on top of it (one per boot; for the phases of a two-phase run, the run's
one overlay, so the final phase sees what the bootstrap phase wrote).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from h2k import accel as accelmod
from h2k.errors import H2KError, InputError
from h2k.profile import MachineProfile
from lab import firmware, qemu_cmd
from lab.console import ConsoleScanner, SocketWatcher
from lab.qmp import QMPClient, QMPError
from lab.scoring import AgentChecker, Decision, Scorer, Signal, SignalBus, finish_evidence, score
from lab.verdict import BootResult, Expect

TAG_PREFIX = "h2k-"
ACPI_REPRESS_SECONDS = 10.0
TMP_PREFIX = "h2k-boot-"

# --------------------------------------------------------------------------------------
# Process and temp-dir registry

_live: dict[int, subprocess.Popen[Any]] = {}
_tmpdirs: set[str] = set()
_lock = threading.Lock()
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    # Die with the lab even if it is SIGKILLed (no cleanup code runs then).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    """Start a lab child in its own process group and register it for cleanup."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_child_setup,
                            stdin=subprocess.DEVNULL, **kw)
    with _lock:
        _live[proc.pid] = proc
    return proc


def terminate(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds, reap it."""
    try:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
    finally:
        with _lock:
            _live.pop(proc.pid, None)


def make_workdir() -> Path:
    d = tempfile.mkdtemp(prefix=TMP_PREFIX)
    with _lock:
        _tmpdirs.add(d)
    return Path(d)


def remove_workdir(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)
    with _lock:
        _tmpdirs.discard(str(d))


def cleanup_all() -> None:
    """Kill every registered child and remove every temp dir (atexit, signal handlers)."""
    with _lock:
        procs = list(_live.values())
        dirs = list(_tmpdirs)
    for p in procs:
        try:
            terminate(p, grace=1.0)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        with _lock:
            _tmpdirs.discard(d)


atexit.register(cleanup_all)


class LabInterrupted(KeyboardInterrupt):
    """SIGTERM arrived: unwind like Ctrl-C so every boot's ``finally`` runs."""


class interrupt_guard:
    """In the main thread, turn SIGTERM (and SIGHUP) into LabInterrupted for the duration."""

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "interrupt_guard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                try:
                    if signal.getsignal(sig) in (signal.SIG_DFL, None):
                        self._old[sig] = signal.signal(sig, self._raise)
                except (ValueError, OSError):
                    pass
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise LabInterrupted(f"signal {signum}")

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------
# Disk overlay

def image_format(image: Path) -> str:
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise InputError(f"{image}: not a disk image qemu-img can read: {exc.stderr.strip()[:200]}") from exc
    return json.loads(out)["format"]


def create_overlay(image: Path, dest: Path) -> Path:
    """A qcow2 overlay backed by ``image``; QEMU writes only the overlay."""
    fmt = image_format(image)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(image.resolve()), str(dest)],
                   check=True, capture_output=True, timeout=60)
    return dest


@dataclass(frozen=True)
class PhaseOverlay:
    """The disk of a two-phase run: one qcow2 overlay on the user's image, in a temp dir of
    the lab. Each phase boots it directly (no per-boot overlay on top), so the final phase
    sees what the bootstrap phase wrote; the image below is only read."""

    path: Path
    lab_notes: list[str] = field(default_factory=list)  # filled at the end: what could not be removed


@contextmanager
def phase_overlay(image: Path) -> Iterator[PhaseOverlay]:
    """The run's overlay on ``image``, removed when the run ends (however it ends)."""
    workdir = make_workdir()
    disk = None
    try:
        try:
            disk = PhaseOverlay(create_overlay(Path(image), workdir / "phases.qcow2"))
        except subprocess.SubprocessError as exc:
            raise H2KError(f"two-phase boot: cannot make an overlay on {image}: {exc}") from None
        yield disk
    finally:
        remove_workdir(workdir)
        if disk is not None and workdir.exists():
            disk.lab_notes.append(f"temp dir {workdir} not removed")


# --------------------------------------------------------------------------------------
# One boot

@dataclass
class BootOptions:
    timeout: float
    outdir: Path
    expect: Expect = field(default_factory=Expect)
    vars_file: Path | None = None  # UEFI NVRAM to use and keep (two-phase)
    shutdown_on_pass: bool = False  # two-phase bootstrap: power off cleanly after passing
    phase_disk: PhaseOverlay | None = None  # a phase of a two-phase run: boot (and write) this overlay
    shutdown_timeout: float = 90.0
    qemu_binary: str = "qemu-system-x86_64"
    screendump: bool = True


# sun_path holds 108 bytes; a deep TMPDIR (pytest's, CI's) overflows it.
_SUN_PATH_MAX = 100


class SocketDir:
    """Where a boot's UNIX sockets live: the workdir, reached through a short
    /proc/self/fd/N alias when its real path is too long for a socket address."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.fd: int | None = None
        if len(str(workdir)) + len("/console.sock") > _SUN_PATH_MAX:
            self.fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
            self.base = Path(f"/proc/self/fd/{self.fd}")
        else:
            self.base = workdir

    def path(self, name: str) -> Path:
        return self.base / name

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    return s


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


class QemuBoot:
    """One running QEMU and its watchers. Use ``run()``; it always tears down."""

    def __init__(self, image: Path | None, profile: MachineProfile, opts: BootOptions) -> None:
        self.image = image
        self.profile = profile
        self.opts = opts
        self.tag = f"{TAG_PREFIX}{uuid.uuid4().hex[:12]}"
        self.outdir = Path(opts.outdir)
        self.timings: dict[str, float] = {}
        self.proc: subprocess.Popen[Any] | None = None
        self.qmp: QMPClient | None = None
        self.watchers: list[SocketWatcher] = []
        self.swtpm: firmware.Swtpm | None = None
        self.workdir: Path | None = None
        self.sockdir: SocketDir | None = None
        self.bus = SignalBus()
        self.agent_checker: AgentChecker | None = None

    def artifacts(self) -> dict[str, str]:
        names = ["serial.log", "qmp.jsonl", "qemu.log", "firmware.log", "screen.png", "agent.jsonl", "verdict.json"]
        return {n: str(self.outdir / n) for n in names if (self.outdir / n).exists() or n == "verdict.json"}

    def run(self) -> BootResult:
        t_start = time.monotonic()
        deadline = t_start + self.opts.timeout
        self.outdir.mkdir(parents=True, exist_ok=True)
        for stale in ("serial.log", "qmp.jsonl", "qemu.log", "firmware.log", "screen.png", "agent.jsonl", "verdict.json"):
            try:
                (self.outdir / stale).unlink()
            except FileNotFoundError:
                pass
        decision: Decision | None = None
        accel = accelmod.decide(announce=False)
        try:
            try:
                self._start(accel)
                decision = self._watch(deadline)
            except (QMPError, OSError, H2KError, subprocess.SubprocessError) as exc:
                if isinstance(exc, InputError):
                    raise
                decision = Decision("incomplete", f"lab error: {exc}" + self._qemu_log_hint(), "lab")
            t_decided = time.monotonic()
            if decision.signal_t is not None:
                self.timings["signal_to_verdict"] = round(t_decided - decision.signal_t, 4)
            self.timings["guest_seconds"] = round(t_decided - self.timings.get("_t_cont", t_decided), 3)
            extra = self._evidence(decision)
        except KeyboardInterrupt:
            # Leave a verdict behind even when the lab is stopped (Ctrl-C, SIGTERM).
            try:
                BootResult("incomplete", "the lab was interrupted", seconds=round(time.monotonic() - t_start, 3),
                           signal="interrupt", profile=self.profile.to_dict(), backend="qemu",
                           accel=accel.accel).write(self.outdir)
            except OSError:
                pass
            raise
        finally:
            t0 = time.monotonic()
            self._teardown()
            self.timings["teardown"] = round(time.monotonic() - t0, 4)
        agent_data = dict(self.agent_checker.result) if self.agent_checker else {}
        if decision.data.get("machine_info"):
            agent_data.setdefault("machine_info", decision.data["machine_info"])
        self.timings.pop("_t_cont", None)
        result = BootResult(
            verdict=decision.verdict,
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
            backend="qemu",
            accel=accel.accel,
            timings=self.timings,
        )
        if extra.get("verdict"):
            result.verdict = extra["verdict"]
        result.write(self.outdir)
        result.artifacts = self.artifacts()
        return result

    # -- start ---------------------------------------------------------------
    def _start(self, accel: accelmod.AccelDecision) -> None:
        t0 = time.monotonic()
        self.workdir = make_workdir()
        wd = self.workdir
        disk = None
        if self.opts.phase_disk is not None:
            disk = self.opts.phase_disk.path
        elif self.image is not None:
            if not Path(self.image).exists():
                raise InputError(f"{self.image}: no such disk image")
            disk = create_overlay(Path(self.image), wd / "overlay.qcow2")
        self.timings["overlay"] = round(time.monotonic() - t0, 4)
        fw = firmware.find(self.profile.firmware)
        vars_path = firmware.prepare_vars(fw, wd, self.opts.vars_file)
        self.sockdir = SocketDir(wd)
        sd = self.sockdir
        tpm_args = None
        if self.profile.tpm:
            self.swtpm = firmware.Swtpm(wd, sock_path=sd.path("tpm.sock"))
            self.swtpm.start()
            tpm_args = self.swtpm.qemu_args(self.profile.machine_type)
        socks = {role: _listen(sd.path(f"{role}.sock")) for role in ("qmp", "console", "fwdbg", "agent")}
        try:
            fds = qemu_cmd.SocketFds(qmp=socks["qmp"].fileno(), console=socks["console"].fileno(),
                                     debugcon=socks["fwdbg"].fileno(), agent=socks["agent"].fileno())
            cmd = qemu_cmd.build(self.profile, accel=accel, name=self.tag, fds=fds,
                                 serial_log=self.outdir / "serial.log", firmware_log=self.outdir / "firmware.log",
                                 disk=disk, fw=fw, vars_path=vars_path, tpm_args=tpm_args,
                                 qemu_binary=self.opts.qemu_binary)
            if sd.fd is not None:  # same number in QEMU, so /proc/self/fd/N/tpm.sock resolves there too
                cmd.pass_fds.append(sd.fd)
            (wd / "argv.json").write_text(json.dumps(cmd.argv))
            with open(self.outdir / "qemu.log", "ab") as log:
                log.write(("# " + " ".join(cmd.argv) + "\n").encode())
                log.flush()
                self.proc = spawn(cmd.argv, pass_fds=cmd.pass_fds, stdout=log, stderr=subprocess.STDOUT)
        finally:
            for s in socks.values():
                s.close()  # QEMU holds the listening sockets now
        self.qmp = QMPClient(sd.path("qmp.sock"), self.outdir / "qmp.jsonl")
        proc = self.proc
        self.qmp.connect(timeout=30, alive=lambda: proc.poll() is None)
        self.timings["start_to_qmp"] = round(time.monotonic() - t0, 4)
        self.qmp.add_listener(self.bus.qmp_listener)
        if self.profile.serial_console:
            w = SocketWatcher(sd.path("console.sock"), ConsoleScanner(self.opts.expect, "console"),
                              self.bus.console_listener("console"), name="console")
            w.start()
            self.watchers.append(w)
        w = SocketWatcher(sd.path("fwdbg.sock"), ConsoleScanner(self.opts.expect, "firmware"),
                          self.bus.console_listener("firmware"), name="firmware")
        w.start()
        self.watchers.append(w)
        threading.Thread(target=self._wait_process, name="qemu-wait", daemon=True).start()
        self.qmp.execute("cont")
        self.timings["_t_cont"] = time.monotonic()
        self.timings["lab_start"] = round(time.monotonic() - t0, 4)

    def _wait_process(self) -> None:
        proc = self.proc
        if proc is None:
            return
        rc = proc.wait()
        self.bus.put(Signal("process", "exited", {"returncode": rc, "log_tail": _log_tail(self.outdir / "qemu.log")}))

    def _qemu_log_hint(self) -> str:
        tail = _log_tail(self.outdir / "qemu.log", 600).strip().splitlines()
        tail = [ln for ln in tail if not ln.startswith("# ")]
        return f" (qemu.log: {tail[-1][:200]})" if tail else ""

    # -- watch ---------------------------------------------------------------
    def _watch(self, deadline: float) -> Decision:
        expect = self.opts.expect
        scorer = Scorer(expect, console_expected=self.profile.serial_console,
                        agent_expected=None if self.profile.guest_agent else False)
        if scorer.impossible:
            return Decision("incomplete", scorer.impossible, "lab")
        if scorer.agent_expected:
            assert self.workdir is not None
            self.agent_checker = AgentChecker(str(self.sockdir.path("agent.sock")), expect, self.bus, deadline,
                                              port_open=scorer.agent_port_open, log_path=self.outdir / "agent.jsonl",
                                              network=scorer.want_network)
            self.agent_checker.start()
        return score(self.bus, scorer, deadline)

    # -- evidence and shutdown -----------------------------------------------
    def _evidence(self, decision: Decision) -> dict[str, Any]:
        def screendump() -> None:
            assert self.qmp is not None
            try:
                self.qmp.execute("screendump", {"filename": str(self.outdir / "screen.png"), "format": "png"}, timeout=10)
            except QMPError:
                pass

        can_dump = self.opts.screendump and self.qmp is not None and not self.qmp.closed.is_set()
        return finish_evidence(decision, self.timings, screendump=screendump if can_dump else None,
                               clean_shutdown=self._clean_shutdown if self.opts.shutdown_on_pass else None)

    def _clean_shutdown(self) -> tuple[bool, str]:
        """Agent guest-shutdown if the agent is connected, else ACPI system_powerdown;
        proof is QMP SHUTDOWN with reason guest-shutdown."""
        assert self.qmp is not None
        how = "ACPI system_powerdown"
        try:
            # Drop events seen so far; wait only for the new SHUTDOWN.
            while not self.qmp.events.empty():
                self.qmp.events.get_nowait()
            client = self.agent_checker.client if self.agent_checker else None
            deadline = time.monotonic() + self.opts.shutdown_timeout
            if client is not None:
                how = "guest agent guest-shutdown"
                client.shutdown("powerdown")
                ev = self.qmp.wait_event("SHUTDOWN", timeout=self.opts.shutdown_timeout)
            else:
                # A guest may miss a power-button press that comes too early (Windows ignores
                # it until its session is up; a small guest may not listen yet): press again
                # every few seconds until SHUTDOWN or the deadline.
                ev = None
                while ev is None and time.monotonic() < deadline:
                    self.qmp.execute("system_powerdown")
                    ev = self.qmp.wait_event("SHUTDOWN", timeout=min(ACPI_REPRESS_SECONDS, deadline - time.monotonic()))
        except (QMPError, OSError) as exc:
            return False, f"{how}: {exc}"
        if ev is None:
            return False, f"{how}: no SHUTDOWN within {self.opts.shutdown_timeout:.0f}s"
        reason = (ev.get("data") or {}).get("reason")
        return reason == "guest-shutdown", f"{how}, SHUTDOWN reason {reason}"

    def _teardown(self) -> None:
        if self.agent_checker is not None:
            self.agent_checker.stop()
            if self.agent_checker.client is not None:
                self.agent_checker.client.close()
        if self.qmp is not None and self.proc is not None and self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=3)
            except QMPError:
                pass
        if self.proc is not None:
            terminate(self.proc, grace=3.0)
        for w in self.watchers:
            w.stop()
        if self.qmp is not None:
            self.qmp.close()
        if self.swtpm is not None:
            self.swtpm.stop()
        if self.sockdir is not None:
            self.sockdir.close()
        if self.workdir is not None:
            remove_workdir(self.workdir)


def run(image: Path | None, profile: MachineProfile, opts: BootOptions) -> BootResult:
    with interrupt_guard():
        return QemuBoot(image, profile, opts).run()
