"""Score a boot from its signals: the first conclusive signal decides.

Backend-independent. Watchers (QMP events, the console, the firmware debug
port, the guest agent, the QEMU process) put ``Signal``s on one ``SignalBus``;
``Scorer.handle`` turns them into a ``Decision`` as soon as one is conclusive;
``score`` runs that loop against a deadline (no sleeps: it blocks on the bus).

Order of strength (DESIGN.md "Scoring a boot"): GUEST_PANICKED with hyper-v
info (stop code) > pvpanic GUEST_PANICKED > EMS BLUESCREEN > console failure
patterns > SHUTDOWN(guest-reset) before success beyond ``Expect.max_reboots`` =
reboot loop > success: the first complete alternative of evidence (console: login
prompt, systemd target, EMS, marker, user patterns; agent; network), all seen in
one boot of the guest. Known issues turn a pass into softfailed. QEMU dying on its
own = incomplete; the deadline = timeout.

A guest reset within the allowance is a reboot, not a verdict: the scorer asks the
backend (``let_guest_reboot``) to let the guest start again, forgets the evidence
of the boot that ended (success must be complete within one boot), tells the agent
checker to start over, and scores on against the same deadline.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from lab import agent as agentmod
from lab import stopcodes
from lab.console import ConsoleEvent
from lab.verdict import AGENT_EVIDENCE, CONSOLE_EVIDENCE, Expect


@dataclass
class Signal:
    source: str  # "qmp" | "console" | "firmware" | "agent" | "process" | "lab"
    name: str  # QMP event name, console event kind, "exited", "ok", "failed", ...
    data: dict[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.monotonic)


class SignalBus:
    """One queue for all watchers; callbacks are thread-safe."""

    def __init__(self) -> None:
        self._q: "queue.Queue[Signal]" = queue.Queue()
        self.history: list[Signal] = []

    def put(self, sig: Signal) -> None:
        self._q.put(sig)

    def get(self, timeout: float) -> Signal | None:
        try:
            sig = self._q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        self.history.append(sig)
        return sig

    # Adapters for the watchers.
    def qmp_listener(self, event: dict[str, Any]) -> None:
        name = event.get("event", "?")
        self.put(Signal("qmp", "closed" if name == "__closed__" else name, event.get("data", {}) or {}))

    def console_listener(self, source: str) -> Callable[[ConsoleEvent], None]:
        def on_event(ev: ConsoleEvent) -> None:
            self.put(Signal(source, ev.kind, {"event": ev}, ev.t))
        return on_event


@dataclass
class Decision:
    verdict: str
    reason: str
    signal: str
    stop_code: int | None = None
    stop_name: str | None = None
    known_issues: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    signal_t: float | None = None  # when the deciding signal was observed (monotonic)
    decided_t: float = field(default_factory=time.monotonic)
    evidence: list[str] = field(default_factory=list)  # a pass: the alternative that decided it
    reboots: int = 0  # guest resets let through before this decision


@dataclass
class Seen:
    """One piece of evidence of success, as first seen."""

    name: str
    words: str  # for the reason line, e.g. "login prompt 'vmw-deb12 login:'"
    t: float


def _words(ev: ConsoleEvent) -> str:
    if ev.name == "ems":
        info = ev.data.get("machine_info")
        return f"Windows kernel up (EMS machine-info: {ev.text})" if info is not None else "SAC prompt on EMS"
    if ev.name == "login":
        return f"login prompt {ev.text!r}"
    if ev.name == "systemd-target":
        return f"systemd reached {ev.data.get('detail', ev.text)!r}"
    if ev.name == "marker":
        return f"console marker {ev.text!r}"
    return f"console pattern {ev.data.get('regex', '?')!r} matched {ev.text!r}"


# What a backend does to let a guest that reset itself run again: None when it runs again,
# else why it could not.
RebootAction = Callable[[], "str | None"]
# A firmware resets the machine again right after a warm reset (SeaBIOS on QEMU cannot restore
# its own RAM copy otherwise: firmware.log shows "In resume (status=0) ... Attempting a hard
# reboot", ~0.1 s after the lab resumed the guest; two requests ms apart when the lab holds
# resets, up to six RESET events within 0.6 s when the host restarts the guest itself).
# Resets this soon after a reboot are that reboot's, not new ones: no guest gets from its
# firmware to a reboot of its own so soon.
REBOOT_SETTLE_SECONDS = 5.0


class Scorer:
    """Turns signals into a decision. Success: the first complete alternative of
    ``expect.alternatives()``; evidence the machine cannot show (no serial console, no agent
    channel) drops the alternatives that need it.

    A guest reset (QMP ``SHUTDOWN`` reason ``guest-reset`` when the backend holds resets, ``RESET``
    reason ``guest-reset`` when the host restarts the guest itself) before success is a reboot
    while ``expect.max_reboots`` allows, else a reboot loop. ``let_guest_reboot``: how the
    backend lets the guest run again; without it every reset before success is a reboot loop.
    ``agent_checker`` (set by the backend) starts over at every reboot."""

    def __init__(self, expect: Expect, *, console_expected: bool = True, agent_expected: bool | None = None,
                 let_guest_reboot: RebootAction | None = None) -> None:
        self.expect = expect
        self.let_guest_reboot = let_guest_reboot
        self.agent_checker: "AgentChecker | None" = None
        self.reboots: list[float] = []  # when each reboot the lab let through began (monotonic)
        self.firmware_resets = 0  # resets that finished a reboot (REBOOT_SETTLE_SECONDS), not counted
        self._held = False  # a held reset is being handled: the guest is paused until QMP RESUME
        self.boot = 0  # which boot of the guest is running: 0, then one more per reboot
        unavailable = set()
        if not console_expected:
            unavailable |= CONSOLE_EVIDENCE
        if agent_expected is False:
            unavailable |= AGENT_EVIDENCE
        self.alternatives = [alt for alt in expect.alternatives() if not unavailable & set(alt)]
        # Start the agent checks only when some alternative needs them (or devices are collected).
        self.agent_expected = any(AGENT_EVIDENCE & set(alt) for alt in self.alternatives) or (
            expect.collect_devices and agent_expected is not False)
        self.want_network = any("network" in alt for alt in self.alternatives)
        self.seen: dict[str, Seen] = {}
        self.dead: dict[str, str] = {}  # evidence that can no longer come -> why (an agent check failed)
        self.known: list[str] = []
        self.machine_info: dict[str, Any] | None = None
        self.agent_port_open = threading.Event()
        self.decision: Decision | None = None

    @property
    def impossible(self) -> str | None:
        """Why no alternative can pass on this machine (checked before the boot), or None."""
        if self.alternatives:
            return None
        return ("no success alternative can be shown on this machine "
                f"({' | '.join('+'.join(a) for a in self.expect.alternatives())} need a serial console "
                "or an agent channel the profile lacks)")

    @property
    def booted(self) -> bool:
        return bool(self.seen)

    def handle(self, sig: Signal) -> Decision | None:
        if self.decision is not None:
            return self.decision
        d = self._handle(sig)
        if d is not None:
            d.signal_t = sig.t
            self.decision = d
        return d

    def _fail(self, reason: str, signal: str, **kw: Any) -> Decision:
        return Decision("failed", reason, signal, known_issues=list(self.known), **kw)

    def _handle(self, sig: Signal) -> Decision | None:
        if sig.source == "qmp":
            return self._qmp(sig)
        if sig.source in ("console", "firmware"):
            return self._console(sig)
        if sig.source == "agent":
            return self._agent(sig)
        if sig.source == "process" and sig.name == "exited":
            return Decision("incomplete", f"QEMU exited unexpectedly (status {sig.data.get('returncode')})"
                            + _tail(sig.data.get("log_tail")), "process", known_issues=list(self.known))
        if sig.source == "lab" and sig.name == "error":
            return Decision("incomplete", sig.data.get("reason", "lab error"), "lab", known_issues=list(self.known))
        return None

    def _agent(self, sig: Signal) -> Decision | None:
        if sig.data.get("boot", self.boot) != self.boot:
            return None  # the agent of a boot that has ended since (its reset was already handled)
        if sig.name in ("ok", "network-ok"):
            name = "agent" if sig.name == "ok" else "network"
            self._saw(name, sig.data.get("summary", "guest agent answered"), sig.t)
            return self._maybe_pass()
        # A failed check: the evidence it was to give (and what needs it) can no longer come.
        failed = sig.data.get("evidence", "agent")
        reason = sig.data.get("reason", "guest agent check failed")
        for name in ("agent", "network") if failed == "agent" else (failed,):
            self.dead.setdefault(name, reason)
        if any(not self.dead.keys() & set(alt) for alt in self.alternatives):
            return None  # another alternative may still pass (e.g. the login prompt)
        return self._fail(reason, "agent", data=sig.data)

    def _saw(self, name: str, words: str, t: float) -> None:
        if name not in self.seen:
            self.seen[name] = Seen(name, words, t)

    def _qmp(self, sig: Signal) -> Decision | None:
        data = sig.data
        if sig.name == "GUEST_PANICKED":
            info = data.get("info") or {}
            if info.get("type") == "hyper-v" and "arg1" in info:
                code = stopcodes.normalize(info["arg1"])
                name = stopcodes.name_of(code)
                args = [info.get(f"arg{i}") for i in range(2, 6)]
                hint = stopcodes.hint(code)
                reason = f"bugcheck {stopcodes.describe(code)}" + (f" ({hint})" if hint else "")
                return self._fail(reason, "qmp-panic-hyperv", stop_code=code, stop_name=name,
                                  data={"params": [f"0x{int(a):016X}" for a in args if a is not None]})
            if info:
                return self._fail(f"guest panicked ({info.get('type', 'unknown')} info: {info})", "qmp-panic")
            return self._fail("guest panicked (pvpanic GUEST_PANICKED, no crash info)", "qmp-panic")
        if sig.name == "SHUTDOWN":
            reason = data.get("reason", "")
            if reason == "guest-reset":
                return self._guest_reset(sig, held=True)
            if reason == "guest-panic":
                return self._fail("guest panicked (SHUTDOWN reason guest-panic)", "qmp-panic")
            if reason == "guest-shutdown" and not self.booted:
                return self._fail("the guest powered off before reaching success", "qmp-shutdown")
            return None
        if sig.name == "RESUME":
            self._held = False  # the guest runs again after a held reset (or for the first time)
            return None
        if sig.name == "RESET" and data.get("reason") == "guest-reset":
            return self._guest_reset(sig, held=False)  # the host restarted the guest itself
        if sig.name == "VSERPORT_CHANGE":
            if data.get("open"):
                self.agent_port_open.set()
            else:
                self.agent_port_open.clear()
            return None
        if sig.name == "closed":
            return Decision("incomplete", "the QMP connection closed: QEMU went away", "qmp-closed",
                            known_issues=list(self.known))
        return None

    def _guest_reset(self, sig: Signal, *, held: bool) -> Decision | None:
        """A reset before success: a reboot within the allowance, else a reboot loop. ``held``:
        the backend paused the guest at its reset (it runs again only through
        ``let_guest_reboot``); else the host has already restarted it."""
        if held and self._held:
            return None  # a second request of the reset being handled (the vCPU ran on for a moment)
        if self.reboots and sig.t - self.reboots[-1] < REBOOT_SETTLE_SECONDS:
            self.firmware_resets += 1  # the firmware finishing the last reboot
            return self._run_again(held)
        resets = len(self.reboots) + 1
        allowed = self.expect.max_reboots if self.let_guest_reboot is not None else 0
        if resets > allowed:
            shown = f"; the last after showing {'+'.join(self.seen)}" if self.booted else ""
            return self._fail(f"reboot loop: {_count(resets, 'guest reset')} before success "
                              f"({allowed or 'none'} allowed){shown}", "qmp-reset")
        # The boot that ended took its evidence with it; the agent starts over with the next one.
        self.reboots.append(sig.t)
        self.boot += 1
        self.seen.clear()
        self.dead.clear()
        self.agent_port_open.clear()
        if self.agent_checker is not None:
            self.agent_checker.restart(self.boot)
        return self._run_again(held)

    def _run_again(self, held: bool) -> Decision | None:
        if not held:
            return None
        assert self.let_guest_reboot is not None
        self._held = True
        why = self.let_guest_reboot()
        if why is not None:
            return Decision("incomplete", f"lab error: could not let the guest reboot ({why})", "lab",
                            known_issues=list(self.known))
        return None

    def _console(self, sig: Signal) -> Decision | None:
        ev: ConsoleEvent = sig.data["event"]
        where = "firmware" if sig.source == "firmware" else "console"
        if ev.kind == "ems-bluescreen":
            code = ev.data.get("stop_code")
            name = ev.data.get("stop_name")
            reason = f"bugcheck {stopcodes.describe(code)} (EMS console)" if code is not None else "bugcheck (EMS console, no stop code)"
            return self._fail(reason, "console-bluescreen", stop_code=code, stop_name=name,
                              data={**ev.data, "crash": True})
        if ev.kind == "failure":
            if ev.verdict == "softfailed":
                self.known.append(f"{ev.name}: {ev.text}")
                return None
            if ev.name == "no-bootable-device":
                return self._fail(f"no bootable device ({where}: {ev.text!r})", f"{where}-failure")
            detail = ev.data.get("detail")
            return self._fail(f"{ev.name}: {detail or ev.text}", f"{where}-failure",
                              data={"line": ev.text, "pattern": ev.name, "crash": ev.name in CRASH_PATTERNS})
        if ev.kind == "evidence":
            if ev.name == "ems" and "machine_info" in ev.data:
                self.machine_info = ev.data["machine_info"]
            self._saw(ev.name, _words(ev), sig.t)
            return self._maybe_pass()
        return None

    def _maybe_pass(self) -> Decision | None:
        done = next((alt for alt in self.alternatives if all(n in self.seen for n in alt)), None)
        if done is None:
            return None
        data: dict[str, Any] = {}
        if self.machine_info:
            data["machine_info"] = self.machine_info
        words = " + ".join(self.seen[n].words for n in done)
        if self.known:
            return Decision("softfailed", f"booted ({words}) with known issues: " + "; ".join(self.known), "success",
                            known_issues=list(self.known), data=data, evidence=list(done))
        return Decision("passed", words, "success", data=data, evidence=list(done))

    def progress(self) -> str:
        """What was seen and what is still missing, for a timeout's reason."""
        parts = []
        if self.seen:
            parts.append("seen: " + ", ".join(self.seen))
        missing = [" + ".join(n for n in alt if n not in self.seen) for alt in self.alternatives]
        if missing:
            parts.append("missing: " + " | ".join(missing))
        if self.dead:
            parts.append("; ".join(dict.fromkeys(self.dead.values())))  # one agent failure kills agent and network
        return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def with_reboots(decision: Decision, reboots: int) -> Decision:
    """Record the reboots the lab let through on a decision, in its reason too ("after 2 guest
    reboots: ..."); a reboot loop's reason already counts them."""
    decision.reboots = reboots
    if reboots and decision.signal != "qmp-reset":
        decision.reason = f"after {_count(reboots, 'guest reboot')}: {decision.reason}"
    return decision


# Console failures that announce a crash QMP may still report with more detail.
CRASH_PATTERNS = {"kernel-panic"}
# Console failures whose own message names the culprit a few lines further on: initramfs-tools
# prints "Gave up waiting for root file system device", a list of common problems, then
# "ALERT!  /dev/sda2 does not exist" in the same burst. The verdict waits (as for a crash,
# CORROBORATE_SECONDS at most) for that line so that it names the root.
NAMED_LATER_BY = {"root-wait-gave-up": "root-missing"}
# How long a console crash waits for the stronger QMP GUEST_PANICKED (same crash, ms apart).
CORROBORATE_SECONDS = 0.5


def finish_evidence(
    decision: Decision,
    timings: dict[str, float],
    *,
    screendump: Callable[[], None] | None,
    clean_shutdown: Callable[[], tuple[bool, str]] | None,
) -> dict[str, Any]:
    """What both backends do once a verdict is decided: a screendump (timed; failures ignored,
    the picture is evidence, not a signal) and, when asked, a clean shutdown after a pass,
    whose failure turns the verdict into "failed". Returns overrides for the result."""
    out: dict[str, Any] = {}
    if screendump is not None:
        t0 = time.monotonic()
        screendump()
        timings["screendump"] = round(time.monotonic() - t0, 4)
    if clean_shutdown is not None and decision.verdict in ("passed", "softfailed"):
        t0 = time.monotonic()
        ok, how = clean_shutdown()
        timings["clean_shutdown"] = round(time.monotonic() - t0, 3)
        if ok:
            out["reason_suffix"] = f"; shut down cleanly ({how})"
        else:
            out["verdict"] = "failed"
            out["reason_suffix"] = f"; but the guest did not shut down cleanly ({how})"
    return out


def _tail(text: str | None) -> str:
    if not text:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (": " + " | ".join(lines[-3:]))[:400] if lines else ""


def score(bus: SignalBus, scorer: Scorer, deadline: float,
          on_signal: Callable[[Signal], None] | None = None,
          corroborate: float = CORROBORATE_SECONDS) -> Decision:
    """Block on the bus until a decision or the deadline (monotonic).

    A crash seen on the console first (Linux prints its panic line just before
    the panic notifiers run pvpanic; Windows EMS writes BLUESCREEN around the
    hv-crash report) waits up to ``corroborate`` seconds for QMP GUEST_PANICKED,
    the stronger signal, so the verdict names it and its stop code. The decision
    records the guest reboots the scorer let through (``with_reboots``).
    """
    return with_reboots(_score(bus, scorer, deadline, on_signal, corroborate), len(scorer.reboots))


def _score(bus: SignalBus, scorer: Scorer, deadline: float, on_signal: Callable[[Signal], None] | None,
           corroborate: float) -> Decision:
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            got = scorer.progress()
            d = Decision("timeout", "no conclusive signal before the deadline" + (f" ({got})" if got else ""),
                         "deadline", known_issues=list(scorer.known))
            scorer.decision = d
            return d
        sig = bus.get(remaining)
        if sig is None:
            continue
        if on_signal:
            on_signal(sig)
        d = scorer.handle(sig)
        if d is not None:
            if (d.data.get("crash") or d.signal.startswith("qmp-panic")) and corroborate > 0:
                return _corroborate(bus, scorer, d, min(deadline, time.monotonic() + corroborate), on_signal)
            if d.data.get("pattern") in NAMED_LATER_BY and corroborate > 0:
                return _named_later(bus, scorer, d, min(deadline, time.monotonic() + corroborate), on_signal)
            return d


def _signals_until(bus: SignalBus, until: float, on_signal: Callable[[Signal], None] | None) -> Iterator[Signal]:
    """The bus's signals until ``until`` (monotonic), each shown to ``on_signal`` first."""
    while True:
        sig = bus.get(until - time.monotonic())
        if sig is None:
            return
        if on_signal:
            on_signal(sig)
        yield sig


def _named_later(bus: SignalBus, scorer: Scorer, first: Decision, until: float,
                 on_signal: Callable[[Signal], None] | None) -> Decision:
    """``first`` with the detail the same console message gives a few lines later, if it comes in time."""
    wanted = NAMED_LATER_BY[first.data["pattern"]]
    for sig in _signals_until(bus, until, on_signal):
        ev = sig.data.get("event") if sig.source in ("console", "firmware") else None
        if ev is not None and ev.kind == "failure" and ev.name == wanted:
            detail = ev.data.get("detail") or ev.text
            first.reason += f"; {wanted}: {detail}"
            first.data = {**first.data, "named": {wanted: detail}, "line2": ev.text}
            scorer.decision = first
            return first
    return first


def _corroborate(bus: SignalBus, scorer: Scorer, first: Decision, until: float,
                 on_signal: Callable[[Signal], None] | None) -> Decision:
    """The same crash seen by the other witness, ms apart: QMP names it best, the console says why."""
    for sig in _signals_until(bus, until, on_signal):
        if first.signal.startswith("qmp-panic"):
            if sig.source in ("console", "firmware"):
                ev = sig.data["event"]
                if ev.kind == "ems-bluescreen" or (ev.kind == "failure" and ev.name in CRASH_PATTERNS):
                    seen = scorer._console(sig)
                    assert seen is not None
                    if first.stop_code is None and seen.stop_code is not None:
                        first.stop_code, first.stop_name = seen.stop_code, seen.stop_name
                    first.reason += f"; console: {seen.reason}"
                    first.data = {**seen.data, **first.data}
                    scorer.decision = first
                    return first
            continue
        if sig.source == "qmp" and sig.name == "GUEST_PANICKED":
            d = scorer._qmp(sig)
            assert d is not None
            if d.stop_code is None and first.stop_code is not None:  # pvpanic + EMS stop code
                d.stop_code, d.stop_name = first.stop_code, first.stop_name
            d.reason += f"; console: {first.reason}"
            d.signal_t = first.signal_t
            d.known_issues = first.known_issues
            d.data = {**first.data, **d.data}
            scorer.decision = d
            return d
    return first


# One guest-network-get-interfaces query; an unanswered one is asked again while time is left.
INTERFACES_TIMEOUT = 10.0


class AgentChecker:
    """Runs the guest-agent checks in a thread and reports them as Signals on the bus:
    ("agent", "ok") once ping and OS info answered (the "agent" evidence; devices first when
    collected), then, when ``network`` (default: some alternative of ``expect`` needs it),
    ("agent", "network-ok") once a NIC has an IPv4 address and the guest pinged the gateway.
    A failed check is ("agent", "failed") with the evidence it was to give. Every signal
    names the boot of the guest it is about (``data["boot"]``).

    Waits for the agent's virtio-serial port to open (QMP VSERPORT_CHANGE) when
    told by ``port_open``. ``restart(boot)`` (the guest rebooted): the session under way
    is dropped (its socket shut, so a blocked read returns at once) and the checks start
    over on a new connection once the next boot's agent opens its port.
    """

    def __init__(self, path: str, expect: Expect, bus: SignalBus, deadline: float,
                 port_open: threading.Event | None = None, log_path: Any = None,
                 network: bool | None = None) -> None:
        self.path = path
        self.expect = expect
        self.network = expect.needs("network") if network is None else network
        self.bus = bus
        self.deadline = deadline
        self.port_open = port_open
        self.log_path = log_path
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-checker", daemon=True)
        self.client: agentmod.AgentClient | None = None
        self._checking = "agent"  # the evidence the check under way is to give
        self.boot = 0  # the boot of the guest being checked
        self._restarted = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._restarted.set()
        if self._thread.ident is not None:  # an interrupt may come between creation and start
            self._thread.join(timeout=3)

    def restart(self, boot: int) -> None:
        """The guest rebooted: check boot number ``boot`` from scratch."""
        self.boot = boot
        self._restarted.set()
        client = self.client
        if client is not None:
            client.interrupt()

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _put(self, name: str, data: dict[str, Any], boot: int) -> None:
        if boot == self.boot:  # nothing about a boot that has ended
            self.bus.put(Signal("agent", name, {**data, "boot": boot}))

    def _failed(self, reason: str, boot: int) -> None:
        self._put("failed", {"reason": reason, "evidence": self._checking, **self.result}, boot)

    def _run(self) -> None:
        while not self._stop.is_set():
            boot = self.boot
            self._restarted.clear()
            try:
                self._check(boot)
            except agentmod.AgentError as exc:
                if not self._stop.is_set() and self._left() > 0:
                    self._failed(f"guest agent: {exc}", boot)
            except OSError as exc:
                if not self._stop.is_set():
                    self._failed(f"guest agent channel error: {exc}", boot)
            finally:
                if self.client is not None and boot != self.boot:
                    self.client.close()
            # This boot is checked (or given up on): wait for the next boot, or the end.
            while boot == self.boot and not self._stop.is_set():
                self._restarted.wait()
                self._restarted.clear()

    def _current(self, boot: int) -> bool:
        return boot == self.boot and not self._stop.is_set()

    def _check(self, boot: int) -> None:
        self.result = {}
        self._checking = "agent"
        if self.port_open is not None:
            while not self.port_open.wait(timeout=0.5):
                if not self._current(boot) or self._left() <= 0:
                    return
        client = agentmod.AgentClient(self.path, self.log_path)
        old, self.client = self.client, client
        if old is not None:
            old.close()
        client.connect(timeout=min(5.0, max(0.1, self._left())))
        # The port may open before the agent reads; retry the handshake until the deadline.
        while True:
            if not self._current(boot):
                return
            try:
                client.sync(timeout=min(3.0, max(0.1, self._left())))
                break
            except agentmod.AgentTimeout:
                if self._left() <= 0:
                    return
        client.ping()
        self.result["osinfo"] = client.osinfo()
        osinfo = self.result["osinfo"]
        if self.expect.collect_devices:
            try:
                self.result["devices"] = client.devices()
            except agentmod.AgentError as exc:
                self.result["devices_error"] = str(exc)
        summary = f"agent up ({osinfo.get('pretty-name') or osinfo.get('name', '?')})"
        self._put("ok", {"summary": summary, **self.result}, boot)
        if self.network:
            self._checking = "network"
            self._check_network(client, boot)

    def _check_network(self, client: agentmod.AgentClient, boot: int) -> None:
        addrs: dict[str, list[str]] = {}
        delay = 0.25
        while not addrs:
            try:
                self.result["interfaces"] = client.interfaces(timeout=INTERFACES_TIMEOUT)
            except agentmod.AgentTimeout:
                # A guest busy bringing its network up (or a starved TCG vCPU) may leave one
                # query unanswered: that is no verdict while time is left. Resynchronise, so a
                # late reply cannot be taken for the next command's, and ask again.
                self.result["interface_query_timeouts"] = self.result.get("interface_query_timeouts", 0) + 1
                if not self._current(boot) or self._left() <= 1:
                    raise
                client.sync(timeout=min(10.0, max(0.1, self._left())))
                continue
            addrs = agentmod.ipv4_addresses(self.result["interfaces"])
            if addrs or not self._current(boot):
                break
            if self._left() <= delay + 1:
                self._failed("no IPv4 address on any NIC (guest-network-get-interfaces)", boot)
                return
            # DHCP has no event we can see from outside: poll with back-off.
            self._stop.wait(delay)
            delay = min(delay * 2, 2.0)
        if not self._current(boot):
            return
        self.result["ipv4"] = addrs
        path, args = agentmod.ping_command(self.result["osinfo"], self.expect.gateway)
        res = client.exec(path, args, timeout=min(20.0, max(1.0, self._left())))
        self.result["gateway_ping"] = res
        if res.get("exitcode") != 0:
            self._failed(f"ping of the gateway {self.expect.gateway} failed "
                         f"(exit {res.get('exitcode')}): {res.get('out', '').strip()[-200:]}", boot)
            return
        nic = ", ".join(f"{k}={'/'.join(v)}" for k, v in addrs.items())
        self._put("network-ok", {"summary": f"IPv4 {nic}, gateway {self.expect.gateway} answers ping", **self.result},
                  boot)
