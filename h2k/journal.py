"""The change journal: what one ``h2k fix`` run changed, so ``h2k rollback`` can undo it.

A journal is plain JSON. It travels inside the guest
(``/hyper2kvm/journal/<run>.json``) and is also written next to the output
image, so a disk carries the record of what was done to it.

It is an *intent* journal, kept durable at every step so that a crash at any
point (h2k killed, the appliance killed with it) leaves enough to roll back:

* it is written before the first change, and every record is written with
  ``state="intent"`` *before* the change it describes (the backup path and the
  SHA-256 before are known then); the change's own data is synced before the
  record turns ``"done"``; ``Journal.state`` turns ``"complete"`` last;
* each save goes to ``<run>.json.new``, is synced (``g.sync()``, which also
  makes every earlier write durable), then renamed over ``<run>.json``, so one
  of the two is always a whole, parseable journal (:func:`read_guest_journal`
  prefers a parseable ``.new``);
* rollback marks each record ``"undone"`` as it goes (``Journal.state =
  "rolling-back"``), so a rollback that was itself interrupted resumes.

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
from typing import Any, Callable

JOURNAL_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: written once after all changes (every record done)
GUEST_JOURNAL_DIR = "/hyper2kvm/journal"
NEW_SUFFIX = ".new"  # the next version of a journal, before it is renamed over the current one

# Record states: written before the change, after the change is synced, after rollback undid it.
INTENT, DONE, UNDONE = "intent", "done", "undone"
# Journal states.
RUNNING, COMPLETE, ROLLING_BACK = "running", "complete", "rolling-back"


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
    """A hive (or BCD store) file that this run changed (or, in state intent, is about to change)."""

    name: str  # SYSTEM, SOFTWARE, BCD
    device: str  # libguestfs device the file lives on
    path: str  # guest path of the file on that device
    backup_path: str  # guest path of the untouched copy (same device)
    sha256_before: str
    sha256_after: str  # the edited hive's hash (known before the upload)
    replayed_logs: list[str] = field(default_factory=list)  # the hive was dirty: logs applied before the edit
    state: str = DONE


@dataclass
class FileRecord:
    """A file written into the guest (copied from the pack or generated)."""

    device: str
    path: str
    sha256_after: str
    sha256_before: str | None = None  # None: the file did not exist before
    backup_path: str | None = None  # where the replaced file was kept
    state: str = DONE


@dataclass
class Journal:
    run_id: str  # UTC timestamp, also used in backup names
    image: str
    control_set: int | None = None
    version: int = JOURNAL_VERSION
    state: str = COMPLETE
    created_dirs: list[list[str]] = field(default_factory=list)  # [device, path], parent first, recorded before mkdir
    hives: list[HiveRecord] = field(default_factory=list)
    files: list[FileRecord] = field(default_factory=list)
    registry: list[RegChange] = field(default_factory=list)

    @staticmethod
    def new_run_id() -> str:
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())

    @property
    def empty(self) -> bool:
        return not (self.hives or self.files or self.registry or self.created_dirs)

    def records(self) -> list[HiveRecord | FileRecord]:
        return [*self.files, *self.hives]

    def steps(self, state: str | None = None) -> int:
        """How many records (files and hives) there are, or are in ``state``."""
        return sum(1 for r in self.records() if state is None or r.state == state)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Journal":
        if not isinstance(data, dict):
            raise ValueError("a journal is a JSON object")
        data = dict(data)
        if data.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"unsupported journal version {data.get('version')!r}")
        data["version"] = JOURNAL_VERSION
        data["hives"] = [HiveRecord(**h) for h in data.get("hives", [])]
        data["files"] = [FileRecord(**f) for f in data.get("files", [])]
        data["registry"] = [RegChange(**r) for r in data.get("registry", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Journal":
        try:
            return cls.from_dict(json.loads(text))
        except TypeError as exc:  # unknown or missing fields
            raise ValueError(f"not a journal: {exc}") from None

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


# ---------------------------------------------------------------- the copy inside the guest


def save_guest_journal(g, path: str, text: str, write: Callable[[str, bytes], None] | None = None) -> None:
    """Make ``text`` the durable content of the guest file ``path`` (a real, mounted path).

    ``path.new`` is written and synced (with every write made before it), then
    renamed over ``path``: at every moment one of the two names holds a whole
    journal. The rename reaches the disk with the next sync (the next save, or
    the unmount); until then the synced ``.new`` is the one read.
    """
    (write or g.write)(path + NEW_SUFFIX, text.encode())
    g.sync()
    g.mv(path + NEW_SUFFIX, path)


def read_guest_journal(g, path: str, parse: Callable[[bytes], Any] | None = None) -> tuple[Any, str]:
    """The newest whole journal at ``path`` (or its ``.new``), and why not when None.

    A crash can leave ``path.new`` half written (then ``path`` is whole) or ``path``
    gone with a whole ``path.new`` (the rename was interrupted). ``parse``: bytes ->
    journal, raising ValueError (default :meth:`Journal.from_json`).
    """
    parse = parse or Journal.from_json
    errors = []
    for cand in (path + NEW_SUFFIX, path):
        if not g.is_file(cand):
            continue
        try:
            return parse(g.read_file(cand)), ""
        except ValueError as exc:
            errors.append(f"{cand.rsplit('/', 1)[-1]}: {exc}")
    return None, "; ".join(errors) or "no journal file"


def run_of(name: str) -> str | None:
    """The run id of a file name in the journal directory (``<run>.json`` or ``<run>.json.new``)."""
    for suffix in (".json" + NEW_SUFFIX, ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


class GuestJournal:
    """One run's journal, kept durable inside the guest and mirrored next to the image on the host.

    The host mirror is written after the guest copy is synced, so whatever it
    shows is already on the guest's disk (tests watch it to kill a run at a step).
    ``journal``: anything with ``to_json()`` (the Windows and the Linux journal).
    """

    def __init__(self, g, journal: Any, guest_path: str, host_path: Path | None = None,
                 write: Callable[[str, bytes], None] | None = None) -> None:
        self.g = g
        self.journal = journal
        self.guest_path = guest_path  # real (mounted) path of <run>.json
        self.host_path = host_path
        self.write = write  # how to write a guest file (default g.write; the fix writes it private on NTFS)

    def save(self) -> None:
        text = self.journal.to_json()
        save_guest_journal(self.g, self.guest_path, text, self.write)
        if self.host_path is not None:
            tmp = self.host_path.with_name(self.host_path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.host_path)
