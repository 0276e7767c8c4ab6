"""Security descriptors as ntfs-3g's own auditing tool decodes them (an oracle independent of h2k).

``ntfssecaudit -rvv VOLUME DIR`` (Debian's ntfs-3g package) opens an NTFS image without
mounting it and prints, for every file and folder under DIR, the owner, the group and each
ACE of the DACL (type, flags, access mask, SID). The volume is one partition of a qcow2,
taken out as a sparse raw file with ``qemu-img convert`` (a raw driver over the qcow2 with
an offset and size): no appliance launch.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512


@dataclass
class Audited:
    path: str
    directory: bool
    owner: str = ""
    group: str = ""
    control: int | None = None  # the descriptor's control flags (0x1000: DACL protected from inheritance)
    aces: list[tuple[int, int, int, str]] = field(default_factory=list)  # (type, flags, mask, SID)

    def grants(self) -> dict[str, int]:
        """SID -> access mask of its allow ACEs."""
        out: dict[str, int] = {}
        for typ, _flags, mask, sid in self.aces:
            if typ == 0:
                out[sid] = out.get(sid, 0) | mask
        return out


def partition_image(qcow2: Path, start_sector: int, end_sector: int, out: Path) -> Path:
    """One partition of a qcow2 (sectors inclusive) as a sparse raw file."""
    spec = {"driver": "raw", "offset": start_sector * SECTOR, "size": (end_sector - start_sector + 1) * SECTOR,
            "file": {"driver": "qcow2", "file": {"driver": "file", "filename": str(qcow2)}}}
    subprocess.run(["qemu-img", "convert", "-O", "raw", "json:" + json.dumps(spec), str(out)], check=True)
    return out


def audit(volume: Path, path: str) -> dict[str, Audited]:
    """Everything under ``path`` (and ``path`` itself), as ntfssecaudit decodes it; keyed by path."""
    proc = subprocess.run(["ntfssecaudit", "-rvv", str(volume), path], capture_output=True, text=True, check=True)
    return parse_audit(proc.stdout)


def audit_file(volume: Path, path: str) -> Audited:
    proc = subprocess.run(["ntfssecaudit", "-vv", str(volume), path], capture_output=True, text=True, check=True)
    got = parse_audit(proc.stdout)
    if path not in got:
        raise AssertionError(f"ntfssecaudit did not describe {path}: {proc.stdout[-500:]}")
    return got[path]


def parse_audit(text: str) -> dict[str, Audited]:
    """ntfssecaudit's very verbose report -> one record per file (entries whose descriptor was
    "already displayed" point at an earlier security key and are filled from it)."""
    out: dict[str, Audited] = {}
    by_key: dict[str, Audited] = {}
    cur: Audited | None = None
    ace: list | None = None
    for line in text.splitlines():
        m = re.match(r"^(File|Directory) (/.*)$", line)
        if m:
            cur = out[m.group(2)] = Audited(m.group(2), m.group(1) == "Directory")
            ace = None
            continue
        if cur is None:
            continue
        s = line.strip()
        m = re.match(r"Security key : (0x[0-9a-f]+)(.*)$", s)
        if m:
            if "already displayed" in m.group(2) and m.group(1) in by_key:
                known = by_key[m.group(1)]
                cur.owner, cur.group, cur.control = known.owner, known.group, known.control
                cur.aces = list(known.aces)  # the same key: the same descriptor
            else:
                by_key[m.group(1)] = cur
            continue
        if s.startswith("O:dec "):
            cur.owner = s.split()[1]
        elif s.startswith("G:dec "):
            cur.group = s.split()[1]
        elif s.startswith("flags ") and ace is None and cur.control is None and not cur.aces:
            cur.control = int(s.split()[1], 16)
        elif re.match(r"ACE \d+ at ", s):
            ace = [None, None, None, None]
        elif ace is not None and s.startswith("type ") and ace[0] is None:
            ace[0] = int(s.split()[1])
        elif ace is not None and s.startswith("flags ") and ace[1] is None:
            ace[1] = int(s.split()[1], 16)
        elif ace is not None and s.startswith("Acc rgts ") and ace[2] is None:
            ace[2] = int(s.split()[2], 16)
        elif ace is not None and s.startswith("dec S-") and ace[3] is None:
            ace[3] = s.split()[1]
            cur.aces.append(tuple(ace))  # type: ignore[arg-type]
            ace = None
    return out
