"""The data of a boot's outcome: what to expect, and the verdict with its evidence.

Verdicts (borrowed from openQA): passed, softfailed (booted, with a known,
non-fatal problem), failed (a reason; for a bugcheck, its code and name),
incomplete (the lab itself broke), timeout.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from h2k.errors import InputError

VERDICTS = ("passed", "softfailed", "failed", "incomplete", "timeout")

# The generic success marker the lab's and the test bed's guests print on the console.
BOOT_OK_MARKER = "H2K-BOOT-OK"


@dataclass(frozen=True)
class Pattern:
    """A typed console pattern, like openQA's serial failures.

    ``verdict`` "failed" ends the boot at once; "softfailed" is a known issue:
    it is recorded and turns a later pass into softfailed. ``source`` says which
    stream it applies to: "console" (COM1), "firmware" (the debug port) or "any".
    """

    name: str
    regex: str
    verdict: str = "failed"
    source: str = "console"
    flags: int = re.MULTILINE
    one_line: bool = False  # never spans a newline (the scanner then resumes at the last line's start)

    def __post_init__(self) -> None:
        if self.verdict not in ("failed", "softfailed"):
            raise ValueError(f"pattern {self.name}: verdict must be failed or softfailed, not {self.verdict!r}")
        if self.source not in ("console", "firmware", "any"):
            raise ValueError(f"pattern {self.name}: source must be console, firmware or any")
        re.compile(self.regex, self.flags)

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.regex, self.flags)

    def applies_to(self, source: str) -> bool:
        return self.source in ("any", source)


# Failures every boot watches for unless an Expect replaces them.
BUILTIN_FAILURES: tuple[Pattern, ...] = (
    # Linux
    Pattern("kernel-panic", r"Kernel panic - not syncing: ?(?P<detail>[^\n]*)"),
    Pattern("root-missing", r"ALERT! +(?P<detail>\S+) does not exist"),
    Pattern("root-wait-gave-up", r"Gave up waiting for root (?:file system )?device"),
    Pattern("initramfs-shell", r"\(initramfs\) $"),
    # dracut (Fedora, RHEL, SUSE; Debian's dracut package): the root wait times out (rd.retry, 2/3 of
    # it), then "Could not boot", the root device, the emergency shell and its prompt.
    Pattern("dracut-timeout", r"Warning: dracut-initqueue: (?P<detail>timeout[^\n]*)"),
    Pattern("dracut-could-not-boot", r"Warning: Could not boot\."),
    Pattern("root-missing", r"Warning: (?P<detail>/dev/\S+) does not exist"),
    Pattern("dracut-emergency", r"Entering emergency mode\. Exit the shell to continue\."),
    Pattern("dracut-shell", r"^dracut:/# ?$"),
    # The kernel itself, with no initramfs able to find the root (its panic line may be mangled).
    Pattern("vfs-no-root", r"VFS: (?:Cannot open root device|Unable to mount root fs on) (?P<detail>[^\n]*)"),
    # systemd in the real root: a mount (fstab) or the root itself failed. Nobody is at the
    # console to log in, so a login prompt cannot come after these.
    Pattern("systemd-emergency", r"You are in (?:emergency|rescue) mode\."),
    Pattern("systemd-emergency", r"Reached target (?P<detail>[^\n]*?(?:Emergency Mode|Rescue Mode|emergency\.target"
                                 r"|rescue\.target)[^\n]*)"),
    # Boot loaders
    Pattern("grub-rescue", r"^grub rescue> ?$"),
    Pattern("grub-no-device", r"error: (?:no such device|unknown filesystem)[^\n]*"),
    # OVMF Secure Boot refusing an unsigned (or wrongly signed) boot loader.
    Pattern("secure-boot-denied", r'BdsDxe: failed to load Boot[0-9A-F]{4} "[^"]*"[^\n]*: Access Denied', source="any"),
    # Firmware: SeaBIOS (debug port; also the console with sercon) and OVMF.
    # (SeaBIOS' per-device "Boot failed: ..." is not conclusive: it tries the next device.)
    Pattern("no-bootable-device", r"No bootable device\.?", source="any"),
    Pattern("no-bootable-device", r"No bootable option or device was found", source="any"),
    # OVMF with a shell falls back to it once every boot option failed (Debian's non-secboot build).
    Pattern("no-bootable-device", r'BdsDxe: (?:loading|starting) Boot[0-9A-F]{4} "EFI Internal Shell"', source="any"),
    # Windows boot manager text on the EMS console
    Pattern("windows-boot-failure", r"Windows failed to start\.[^\n]*"),
)
# Every built-in pattern matches within one line.
BUILTIN_FAILURES = tuple(replace(p, one_line=True) for p in BUILTIN_FAILURES)


# Evidence of success a boot can show, by name (the CLI's --success, the matrix's expect:, the
# pytest plugin's --success and the reason line all use these names).
EVIDENCE: dict[str, str] = {
    "agent": "the guest agent answered guest-ping and guest-get-osinfo",
    "network": "an IPv4 address from guest-network-get-interfaces and a ping of the gateway run by the agent "
               "(implies agent)",
    "login": "a serial login prompt '<host> login:'",
    "systemd-target": "systemd reached its default target on the console (Multi-User System, Graphical Interface)",
    "ems": "Windows EMS/SAC on the console: <machine-info> outside a <BP> block, or a SAC> prompt",
    "marker": f"the test bed's {BOOT_OK_MARKER} line on the console",
    "pattern": "a user regex on the console (--expect-pattern)",
}
CONSOLE_EVIDENCE = frozenset({"login", "systemd-target", "ems", "marker", "pattern"})
AGENT_EVIDENCE = frozenset({"agent", "network"})

# Success per OS family: a list of alternatives, each a list of evidence that must all be seen;
# the first complete alternative passes the boot. "testbed" is the lab's and the test bed's own
# guests, which print the marker.
OS_FAMILIES = ("linux", "windows", "testbed")
DEFAULT_SUCCESS: dict[str, tuple[tuple[str, ...], ...]] = {
    "linux": (("login",), ("systemd-target",), ("agent",)),
    "windows": (("ems",), ("agent",)),
    "testbed": (("marker",),),
}
# A Windows boot that must first run h2k's first-boot installer (two-phase, or a fresh fix booted
# directly): EMS <machine-info> comes with the kernel, before services and before the installer
# has run; the agent answers only after the installer has put it there.
WINDOWS_FIRST_BOOT_SUCCESS: tuple[tuple[str, ...], ...] = (("agent",),)


def parse_success(specs: Iterable[str] | str) -> list[list[str]]:
    """``["agent+login", "ems"]`` -> ``[["agent", "login"], ["ems"]]``; InputError for unknown names."""
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs:
        names = [n.strip() for n in str(spec).split("+")]
        out.append(names)
    return check_success(out)


def check_success(alternatives: Any) -> list[list[str]]:
    """Validate success alternatives (a list of lists of evidence names); InputError names the problem."""
    if not isinstance(alternatives, (list, tuple)) or not alternatives:
        raise InputError("success: give at least one alternative (e.g. agent+login)")
    out: list[list[str]] = []
    for alt in alternatives:
        if isinstance(alt, str) or not isinstance(alt, (list, tuple)) or not alt:
            raise InputError(f"success: {alt!r} is not a list of evidence names")
        names: list[str] = []
        for name in alt:
            if name not in EVIDENCE:
                raise InputError(f"success: unknown evidence {name!r} (known: {', '.join(EVIDENCE)})")
            if name not in names:
                names.append(name)
        out.append(names)
    return out


@dataclass
class Expect:
    """What counts as success and failure for one boot.

    ``success``: alternatives of evidence names (``EVIDENCE``); the boot passes when every name
    of any one alternative has been seen. None: ``[["pattern"]]`` when ``success_patterns`` are
    given, else the test bed's marker. ``Expect.for_os`` gives the defaults of an OS family.
    ``require_agent`` / ``require_network`` add "agent" / "network" to every alternative.
    """

    success: list[list[str]] | None = None
    success_patterns: list[str] = field(default_factory=list)  # the regexes of the "pattern" evidence
    failure_patterns: list[Pattern] = field(default_factory=lambda: list(BUILTIN_FAILURES))
    known_issues: list[Pattern] = field(default_factory=list)  # softfail rules
    require_agent: bool = False  # guest-ping + guest-get-osinfo must answer
    require_network: bool = False  # IPv4 on a NIC + guest-exec ping of the gateway
    gateway: str = "10.0.2.2"  # slirp's gateway
    collect_devices: bool = False  # guest-get-devices into the result (driver gate)
    os_family: str | None = None  # where the default success came from (for_os); informational

    def __post_init__(self) -> None:
        self.success_patterns = list(self.success_patterns or [])
        for regex in self.success_patterns:
            try:
                re.compile(regex, re.M)
            except re.error as exc:
                raise InputError(f"success pattern {regex!r}: not a valid regex: {exc}") from None
        if self.success is None:
            self.success = [["pattern"]] if self.success_patterns else [list(a) for a in DEFAULT_SUCCESS["testbed"]]
        self.success = check_success(self.success)
        uses_pattern = any("pattern" in alt for alt in self.success)
        if uses_pattern and not self.success_patterns:
            raise InputError("success: evidence 'pattern' needs at least one success pattern (--expect-pattern)")
        if self.success_patterns and not uses_pattern:
            raise InputError("success patterns are given but no success alternative uses 'pattern' "
                             "(add one, e.g. --success pattern)")
        if self.os_family is not None and self.os_family not in OS_FAMILIES:
            raise InputError(f"unknown OS family {self.os_family!r} (known: {', '.join(OS_FAMILIES)})")

    @classmethod
    def for_os(cls, os_family: str, *, first_boot: bool = False, **overrides: Any) -> "Expect":
        """The defaults of ``os_family`` (linux, windows, testbed); ``overrides`` set any field.

        ``first_boot``: a Windows boot that runs h2k's first-boot installer needs the agent
        (``WINDOWS_FIRST_BOOT_SUCCESS``). Success patterns without an explicit ``success``
        replace the family's default (``[["pattern"]]``), as ``--expect-pattern`` always has.
        """
        if os_family not in OS_FAMILIES:
            raise InputError(f"unknown OS family {os_family!r} (known: {', '.join(OS_FAMILIES)})")
        if overrides.get("success") is None and not overrides.get("success_patterns"):
            default = WINDOWS_FIRST_BOOT_SUCCESS if first_boot and os_family == "windows" else DEFAULT_SUCCESS[os_family]
            overrides["success"] = [list(a) for a in default]
        return cls(os_family=os_family, **overrides)

    def alternatives(self) -> list[list[str]]:
        """The success alternatives in force: require_agent/require_network added, network implying agent."""
        assert self.success is not None
        out = []
        for alt in self.success:
            names = list(alt)
            if self.require_agent and "agent" not in names:
                names.append("agent")
            if self.require_network and "network" not in names:
                names.append("network")
            if "network" in names and "agent" not in names:
                names.insert(names.index("network"), "agent")
            if names not in out:
                out.append(names)
        return out

    def needs(self, name: str) -> bool:
        """True if some alternative in force uses evidence ``name``."""
        return any(name in alt for alt in self.alternatives())

    def all_failure_patterns(self) -> list[Pattern]:
        pats = list(self.failure_patterns)
        for p in self.known_issues:
            pats.append(p if p.verdict == "softfailed" else Pattern(p.name, p.regex, "softfailed", p.source, p.flags,
                                                                    p.one_line))
        return pats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Expect":
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("failure_patterns", "known_issues"):
            if key in data:
                data[key] = [p if isinstance(p, Pattern) else Pattern(**p) for p in data[key]]
        return cls(**data)


@dataclass
class BootResult:
    verdict: str
    reason: str
    stop_code: int | None = None
    stop_name: str | None = None
    seconds: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    signal: str | None = None  # which signal decided: qmp-panic, console, agent, deadline, ...
    evidence: list[str] = field(default_factory=list)  # a pass: the evidence names that decided it
    known_issues: list[str] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    backend: str = "qemu"
    accel: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)  # two-phase boots: one entry per phase

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, not {self.verdict!r}")

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    @property
    def stop_code_hex(self) -> str | None:
        return None if self.stop_code is None else f"0x{self.stop_code:08X}"

    def one_line(self) -> str:
        text = f"{self.verdict}: {self.reason}"
        return f"{text} ({self.seconds:.1f}s)"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop_code_hex"] = self.stop_code_hex
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BootResult":
        data = {k: v for k, v in data.items() if k != "stop_code_hex"}
        return cls(**data)

    def write(self, outdir: Path) -> Path:
        path = Path(outdir) / "verdict.json"
        self.artifacts.setdefault("verdict.json", str(path))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path
