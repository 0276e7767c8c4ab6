"""The change journal: what one ``h2k fix`` run changed, so ``h2k rollback`` can undo it.

A journal is plain JSON. It travels inside the guest
(``/hyper2kvm/journal/<run>.json``) and is also written next to the output
image, so a disk carries the record of what was done to it.

Per hive and BCD store the journal keeps the in-guest backup path and the
SHA-256 before and after: rollback restores the backup and checks it is
byte-identical to the "before" hash. The per-value records (old type/data or
absence, new type/data) allow a semantic undo when a backup is missing, and
tell a person exactly what changed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1
GUEST_JOURNAL_DIR = "/hyper2kvm/journal"


@dataclass
class RegChange:
    """One registry change. Data is hex of the raw value bytes (types as REG_*)."""

    hive: str  # SYSTEM, SOFTWARE, BCD
    key: str  # resolved path ({CCS} replaced), backslash-separated, from the hive root
    action: str  # "set-value" or "delete-key"
    name: str | None = None  # value name ("" = default value); None for delete-key
    old_type: int | None = None  # None: the value did not exist
    old_data: str | None = None
    new_type: int | None = None
    new_data: str | None = None
    created_keys: list[str] = field(default_factory=list)  # keys this change created, parent first
    deleted_tree: dict[str, Any] | None = None  # for delete-key: the subtree as it was
    why: str = ""


@dataclass
class HiveRecord:
    """A hive (or BCD store) file that this run changed."""

    name: str  # SYSTEM, SOFTWARE, BCD
    device: str  # libguestfs device the file lives on
    path: str  # guest path of the file on that device
    backup_path: str  # guest path of the untouched copy (same device)
    sha256_before: str
    sha256_after: str
    replayed_logs: list[str] = field(default_factory=list)  # the hive was dirty: logs applied before the edit


@dataclass
class FileRecord:
    """A file written into the guest (copied from the pack or generated)."""

    device: str
    path: str
    sha256_after: str
    sha256_before: str | None = None  # None: the file did not exist before
    backup_path: str | None = None  # where the replaced file was kept


@dataclass
class Journal:
    run_id: str  # UTC timestamp, also used in backup names
    image: str
    control_set: int | None = None
    version: int = JOURNAL_VERSION
    created_dirs: list[list[str]] = field(default_factory=list)  # [device, path], parent first
    hives: list[HiveRecord] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    registry: list[RegChange] = field(default_factory=list)

    @staticmethod
    def new_run_id() -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    @property
    def empty(self) -> bool:
        return not (self.hives or self.files or self.registry)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Journal":
        data = dict(data)
        if data.get("version") != JOURNAL_VERSION:
            raise ValueError(f"unsupported journal version {data.get('version')!r}")
        data["hives"] = [HiveRecord(**h) for h in data.get("hives", [])]
        data["files"] = [FileRecord(**f) for f in data.get("files", [])]
        data["registry"] = [RegChange(**r) for r in data.get("registry", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Journal":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Journal":
        return cls.from_json(Path(path).read_text())


def host_journal_path(output: str | Path, run_id: str) -> Path:
    """Where the journal of one run sits next to the output image."""
    output = Path(output)
    return output.with_name(f"{output.name}.h2k-journal-{run_id}.json")


def host_journals(output: str | Path) -> list[Path]:
    """All host-side journals of an output image, oldest first."""
    output = Path(output)
    return sorted(output.parent.glob(f"{output.name}.h2k-journal-*.json"))
