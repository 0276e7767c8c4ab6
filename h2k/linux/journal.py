"""The Linux change journal: every file ``fix`` changed, with its in-guest backup, so ``rollback`` can undo it.

Plain JSON, kept inside the guest (``/var/lib/hyper2kvm/journal/<run>.json``)
and next to the output image. Backups live in the guest under
``/var/lib/hyper2kvm/backup/<run>/<original path>``; removed packages are kept
as a tar of their files plus dpkg's records.

Like the Windows journal (:mod:`h2k.journal`) it is an intent journal: written
and synced before the first change, each record saved in state ``intent``
before its change (with the backup already planned), ``done`` after, and
``undone`` by rollback, so a crash at any point can be rolled back.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from h2k.journal import COMPLETE, DONE

LINUX_JOURNAL_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: written once after all changes
GUEST_STATE_DIR = "/var/lib/hyper2kvm"
GUEST_JOURNAL_DIR = f"{GUEST_STATE_DIR}/journal"
GUEST_BACKUP_DIR = f"{GUEST_STATE_DIR}/backup"


@dataclass
class FileChange:
    path: str  # guest path
    action: str  # modified, created, deleted
    why: str
    backup: str | None = None  # guest path of the untouched copy (None: it did not exist)
    sha256_before: str | None = None
    sha256_after: str | None = None
    state: str = DONE


@dataclass
class PackageRemoval:
    name: str
    backup_tar: str  # guest path: the package's files and dpkg's records, as they were (complete once it exists)
    why: str
    state: str = DONE


@dataclass
class LinuxJournal:
    run_id: str
    image: str
    kind: str = "linux"
    version: int = LINUX_JOURNAL_VERSION
    state: str = COMPLETE
    files: list[FileChange] = field(default_factory=list)
    packages: list[PackageRemoval] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # guest commands run, in order

    @staticmethod
    def new_run_id() -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    @property
    def empty(self) -> bool:
        return not (self.files or self.packages)

    def guest_path(self) -> str:
        return f"{GUEST_JOURNAL_DIR}/{self.run_id}.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "LinuxJournal":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kind") != "linux" or data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"not a Linux journal of version {', '.join(map(str, READABLE_VERSIONS))}")
        data["version"] = LINUX_JOURNAL_VERSION
        try:
            data["files"] = [FileChange(**f) for f in data.get("files", [])]
            data["packages"] = [PackageRemoval(**p) for p in data.get("packages", [])]
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"not a Linux journal: {exc}") from None
