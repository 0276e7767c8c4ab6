"""The data of a boot's outcome: what to expect, and the verdict with its evidence.

Verdicts (borrowed from openQA): passed, softfailed (booted, with a known,
non-fatal problem), failed (a reason; for a bugcheck, its code and name),
incomplete (the lab itself broke), timeout.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class Expect:
    """What counts as success and failure for one boot."""

    success_patterns: list[str] = field(default_factory=lambda: [re.escape(BOOT_OK_MARKER)])
    # EMS <machine-info> (the Windows kernel is up) counts as success unless switched off.
    ems_machine_info_is_success: bool = True
    failure_patterns: list[Pattern] = field(default_factory=lambda: list(BUILTIN_FAILURES))
    known_issues: list[Pattern] = field(default_factory=list)  # softfail rules
    require_agent: bool = False  # guest-ping + guest-get-osinfo must answer
    require_network: bool = False  # IPv4 on a NIC + guest-exec ping of the gateway
    gateway: str = "10.0.2.2"  # slirp's gateway
    collect_devices: bool = False  # guest-get-devices into the result (driver gate)

    def all_failure_patterns(self) -> list[Pattern]:
        pats = list(self.failure_patterns)
        for p in self.known_issues:
            pats.append(p if p.verdict == "softfailed" else Pattern(p.name, p.regex, "softfailed", p.source, p.flags))
        return pats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Expect":
        data = dict(data)
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
