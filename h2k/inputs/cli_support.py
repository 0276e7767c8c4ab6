"""Glue for the engine commands: any input in, a disk path and merged metadata out; profiles written after a fix.

Every command that takes a disk calls :func:`engine_input` first, so
``h2k inspect vm.vmx``, ``h2k fix vm.ova -o out.qcow2`` or ``h2k verify
web1.qcow2`` (with ``web1.qcow2.json`` beside it) all work. Source metadata
from the input is the base; an explicit ``--metadata`` file wins over it; the
engine lets both win over what the disk's layout suggests (firmware).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from h2k.errors import InputError
from h2k.image import DiskImage
from h2k.inputs.source import ResolvedInput, SourceMachine, input_kind, load_machine, resolve_input

RICH_METADATA = ("vmx", "ovf", "ova", "hyperv", "xml", "vmcx")
PROFILE_SUFFIX = ".machine.json"


def metadata_dict(path: str | Path | None) -> dict[str, Any] | None:
    """``--metadata FILE``: .vmx/.ovf/.ova/Hyper-V .xml through our parsers; JSON as h2k.inspect reads it."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise InputError(f"cannot read metadata {p}: no such file")
    if input_kind(p) in RICH_METADATA:
        return load_machine(p).to_metadata()
    saved = _saved_profiles(p)
    if saved is not None:
        return saved
    from h2k.inspect import load_metadata

    return load_metadata(p)


def _saved_profiles(p: Path) -> dict[str, Any] | None:
    """The metadata kept in an ``OUT.machine.json`` written by :func:`write_profiles`, else None."""
    if not p.name.endswith(PROFILE_SUFFIX):
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: not a machine profile file ({exc})") from None
    if not isinstance(data, dict) or "final" not in data:
        raise InputError(f"{p}: not a machine profile file (no 'final' profile)")
    final = data["final"]
    fw = final.get("firmware", "bios")
    meta: dict[str, Any] = {"firmware": "uefi" if fw.startswith("uefi") else "bios",
                            "secure_boot": fw == "uefi-secureboot"}
    for key in ("memory_mb", "cpus"):
        if final.get(key) is not None:
            meta[key] = final[key]
    from h2k.domain import macs_of

    macs = macs_of(data) or macs_of(final)  # older files kept one "mac" in the profile
    if macs:
        meta["macs"] = macs
    return meta


def profiles_beside(image: str | Path) -> Path | None:
    """``IMAGE.machine.json`` if ``h2k fix`` left one next to the disk."""
    cand = Path(str(image) + PROFILE_SUFFIX)
    return cand if cand.is_file() else None


@contextmanager
def engine_input(image: str, metadata_path: str | None = None, workdir: str | Path | None = None
                 ) -> Iterator[tuple[DiskImage, dict[str, Any] | None, ResolvedInput]]:
    """(boot disk as the front door opened it, merged metadata, the resolved input); extracted
    files are removed on exit."""
    with tempfile.TemporaryDirectory(prefix=".h2k-input-", dir=workdir) as work:
        res = resolve_input(image, work)
        try:
            meta = dict(res.metadata() or {})
            meta.update(metadata_dict(metadata_path) or {})
            yield res.image, (meta or None), res
        finally:
            res.cleanup()


def default_fix_output(given: str) -> Path:
    """Where ``h2k fix vm.ova`` writes without -o: vm.h2k.qcow2 next to the archive."""
    p = Path(given)
    return p.with_name(f"{p.stem}.h2k.qcow2")


def write_profiles(disk_out: str | Path, machine: SourceMachine | None, meta: dict[str, Any] | None,
                   facts: dict[str, Any] | None, os_type: str, bus: str) -> Path:
    """Bootstrap and final machine profiles beside the fixed disk, keeping firmware, MACs, CPUs, memory."""
    from h2k import domain

    meta = dict(meta or {})
    macs = domain.macs_of(meta)
    facts = facts or {}
    firmware = meta.get("firmware") or facts.get("firmware") or "bios"  # source metadata wins
    spec = {
        "os": os_type, "firmware": firmware, "secure_boot": bool(meta.get("secure_boot")),
        "name": meta.get("name") or Path(disk_out).name.split(".")[0], "macs": macs,
        "memory_mb": meta.get("memory_mb"), "cpus": meta.get("cpus"),
        "build": facts.get("build") or 0, "is_server": facts.get("is_server", False),
    }
    final_bus = "virtio-scsi" if bus == "virtio-scsi" else "virtio-blk"
    out = Path(str(disk_out) + PROFILE_SUFFIX)
    data = {
        "disk": str(Path(disk_out).resolve()),
        "source": machine.to_dict() if machine else None,
        "macs": macs,
        "bootstrap": domain.bootstrap_profile(spec).to_dict(),
        "final": domain.final_profile(spec, bus=final_bus).to_dict(),
    }
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out

