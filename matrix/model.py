"""The matrix's data: what a matrix file says, the cells it expands to, and their results.

Everything here is plain data (dataclasses, JSON-serialisable): the loader
fills a ``MatrixSpec``, ``expand`` turns it into ``Cell``s, the runner gives
each cell a ``CellResult``, and the reports and the gate read ``RunResults``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

FIRMWARES = ("bios", "uefi", "uefi-secureboot")
BUSES = ("virtio-blk", "virtio-scsi", "sata", "ide")
NICS = ("virtio-net", "e1000e", "e1000", "rtl8139", "vmxnet3", "none")
BOOT_MODES = ("two-phase", "direct")
KINDS = ("windows", "linux")
MODES = ("boot", "fix+verify")  # fix+verify: the phony Windows disks, which cannot boot

# Verdicts, as the lab gives them, plus "skipped" for a cell that never started.
VERDICTS = ("passed", "softfailed", "failed", "incomplete", "timeout", "skipped")
GOOD_VERDICTS = ("passed", "softfailed")
BAD_VERDICTS = ("failed", "timeout", "incomplete", "skipped")

# The keys a match rule (include/exclude/timeouts/known issues) may name.
RULE_KEYS = ("image", "pack", "firmware", "bus", "nic", "boot_mode", "kind", "mode", "id")

# How a cell's verdict is reached, the README's words: a guest really booted under QEMU, static
# boot-readiness rules read on a disk that cannot boot (fix+verify), or a shape replayed from a
# recording (an executor that runs no guest). A gate never compares two different modes.
PROOF_MODES = ("real boot", "static verify", "recorded shape")


def proof_of(mode: str) -> str:
    """The proof mode of a cell by what it does: ``fix+verify`` cells verify, the others boot."""
    return "static verify" if mode == "fix+verify" else "real boot"


RESULTS_FORMAT = "hyper2kvm-matrix-results"
RESULTS_VERSION = 1


@dataclass
class ImageSpec:
    name: str
    kind: str  # windows | linux
    path: str | None = None  # a disk image (qcow2, raw, vmdk ...)
    recipe: str | None = None  # or a test-bed artefact name ('h2k testbed list')
    os: str | None = None  # expected OS, e.g. "windows-server-2019" or "debian-12"
    mode: str = "boot"  # boot | fix+verify
    memory_mb: int | None = None
    firmware: list[str] | None = None  # restricts the matrix's firmware list for this image
    bus: list[str] | None = None
    nic: list[str] | None = None
    expect: "ExpectSpec | None" = None  # what passes its boots (None: the kind's default)


@dataclass
class PackSpec:
    name: str
    path: str | None = None  # a virtio-win ISO or directory tree
    recipe: str | None = None  # or a test-bed artefact name


@dataclass
class Rule:
    """A partial cell: every key given must match (a list means any of; strings may be globs)."""

    match: dict[str, Any]

    def matches(self, cell: "Cell") -> bool:
        for key, want in self.match.items():
            have = cell.field(key)
            options = want if isinstance(want, list) else [want]
            if not any(_match_one(have, opt) for opt in options):
                return False
        return True


def _match_one(have: Any, want: Any) -> bool:
    if have is None:
        return want is None
    if isinstance(want, str):
        return fnmatch.fnmatchcase(str(have), want)
    return have == want


@dataclass
class TimeoutRule:
    rule: Rule
    seconds: int


@dataclass
class KnownIssue:
    """A known, non-fatal problem: a matching cell that fails is reported as softfailed."""

    rule: Rule
    reason: str
    stop_code: int | None = None  # only a failure with this stop code is softened
    reason_contains: str | None = None  # only a failure whose reason contains this text


@dataclass(frozen=True)
class ExpectSpec:
    """A matrix file's ``expect:``: success alternatives (evidence names) and/or console regexes.

    Unset keys (None) keep what comes before: the image kind's default, then the image's
    ``expect:``, then each matching rule in file order.
    """

    success: tuple[tuple[str, ...], ...] | None = None
    patterns: tuple[str, ...] | None = None


@dataclass
class ExpectRule:
    rule: Rule
    expect: ExpectSpec


@dataclass
class MatrixSpec:
    name: str
    source: str  # the file it came from (for messages)
    images: list[ImageSpec]
    packs: list[PackSpec]
    firmware: list[str]
    bus: list[str]
    nic: list[str]
    boot_mode: list[str]
    include: list[Rule] = field(default_factory=list)
    exclude: list[Rule] = field(default_factory=list)
    default_timeout: int = 900
    timeouts: list[TimeoutRule] = field(default_factory=list)
    known_issues: list[KnownIssue] = field(default_factory=list)
    expect: list[ExpectRule] = field(default_factory=list)

    def image(self, name: str) -> ImageSpec:
        return next(i for i in self.images if i.name == name)

    def pack(self, name: str | None) -> PackSpec | None:
        if name is None:
            return None
        return next(p for p in self.packs if p.name == name)


@dataclass(frozen=True)
class Cell:
    """One configuration to run: an image (fixed with a pack) on one machine shape."""

    id: str
    image: str
    kind: str
    mode: str
    pack: str | None
    firmware: str
    bus: str
    nic: str
    boot_mode: str
    timeout: int
    known_issue: str | None = None  # reason text of the first matching known issue
    # What passes this cell's boots (the matrix's expect:); empty: the kind's default.
    success: tuple[tuple[str, ...], ...] = ()
    patterns: tuple[str, ...] = ()

    def field(self, key: str) -> Any:
        return getattr(self, key)

    @property
    def config(self) -> str:
        """The machine configuration without the image (a column in the markdown grid)."""
        return self.id.split(".", 1)[1] if "." in self.id else self.id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        d = {k: data.get(k) for k in cls.__dataclass_fields__ if k not in ("success", "patterns")}
        d["success"] = tuple(tuple(alt) for alt in data.get("success") or ())
        d["patterns"] = tuple(data.get("patterns") or ())
        return cls(**d)


@dataclass
class CellResult:
    """The outcome of one cell. ``artifacts`` maps a name to a path (serial.log, qmp.jsonl ...)."""

    cell: Cell
    verdict: str
    reason: str = ""
    stop_code: int | None = None
    stop_name: str | None = None
    seconds: float = 0.0
    artifacts: dict[str, str] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)  # guest agent data (osinfo, devices ...)
    host: str | None = None  # libvirt URI the cell ran on, None for local QEMU
    phases: list[dict[str, Any]] = field(default_factory=list)  # per boot phase: bootstrap, final
    note: str = ""  # e.g. the known issue that turned a failure into softfailed
    evidence: list[str] = field(default_factory=list)  # a pass: the evidence names that decided it
    # What the lab changed on its own copy of the image to observe the boot (e.g. EMS for Windows).
    lab_setup: dict[str, Any] = field(default_factory=dict)
    proof: str = ""  # one of PROOF_MODES; empty = from the cell's mode (older results files too)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {self.verdict!r}")
        self.proof = self.proof or proof_of(self.cell.mode)
        if self.proof not in PROOF_MODES:
            raise ValueError(f"unknown proof mode {self.proof!r}")

    @property
    def id(self) -> str:
        return self.cell.id

    @property
    def good(self) -> bool:
        return self.verdict in GOOD_VERDICTS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["id"] = self.cell.id
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CellResult":
        data = dict(data)
        data.pop("id", None)
        data["cell"] = Cell.from_dict(data["cell"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class RunResults:
    """A whole run: the versioned content of results.json."""

    matrix: str
    cells: list[CellResult]
    started: str = ""
    finished: str = ""
    interrupted: bool = False
    shard: str | None = None
    matrix_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def by_id(self) -> dict[str, CellResult]:
        return {r.id: r for r in self.cells}

    def counts(self) -> dict[str, int]:
        out = {v: 0 for v in VERDICTS}
        for r in self.cells:
            out[r.verdict] += 1
        return out

    def proof_counts(self) -> dict[str, int]:
        out = {m: 0 for m in PROOF_MODES}
        for r in self.cells:
            out[r.proof] += 1
        return out

    @property
    def ok(self) -> bool:
        return not self.interrupted and all(r.good for r in self.cells)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "matrix": self.matrix,
            "matrix_file": self.matrix_file,
            "shard": self.shard,
            "started": self.started,
            "finished": self.finished,
            "interrupted": self.interrupted,
            "counts": self.counts(),
            "proof_counts": self.proof_counts(),
            "extra": self.extra,
            "cells": [r.to_dict() for r in self.cells],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResults":
        return cls(
            matrix=data["matrix"],
            cells=[CellResult.from_dict(c) for c in data["cells"]],
            started=data.get("started", ""),
            finished=data.get("finished", ""),
            interrupted=bool(data.get("interrupted", False)),
            shard=data.get("shard"),
            matrix_file=data.get("matrix_file"),
            extra=data.get("extra") or {},
        )
