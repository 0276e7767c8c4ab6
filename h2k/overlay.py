"""Where ``fix`` writes: a qcow2 overlay over the untouched source, an output copy, or the source itself.

An overlay costs milliseconds and leaves the source read-only (QEMU never
writes a backing file). ``-o OUT`` makes a standalone copy with
``qemu-img convert`` instead. Work always happens on a temporary overlay
first, so a refused fix (blocker, bad input) leaves no output behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from h2k.errors import H2KError, InputError

OVERLAY_SUFFIX = ".h2k.qcow2"


def sha256_file(path: str | Path, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def image_format(path: str | Path) -> str:
    """The disk image format qemu-img sees (qcow2, raw, vmdk, vhdx ...). Unreadable -> InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise InputError(f"{path}: not a disk image qemu-img can read ({reason})")
    return json.loads(proc.stdout)["format"]


def default_overlay(image: str | Path) -> Path:
    image = Path(image)
    return image.with_name(image.name + OVERLAY_SUFFIX)


def create_overlay(source: str | Path, overlay: str | Path) -> Path:
    """A qcow2 overlay whose backing file is ``source`` (absolute path, format pinned)."""
    source = Path(source).resolve()
    overlay = Path(overlay)
    fmt = image_format(source)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(source), str(overlay)])
    return overlay


def convert(source: str | Path, output: str | Path) -> Path:
    """A standalone copy of ``source`` (which may be an overlay) at ``output``: raw for .raw/.img, else qcow2."""
    output = Path(output)
    out_fmt = "raw" if output.suffix.lower() in (".raw", ".img") else "qcow2"
    _run(["qemu-img", "convert", "-q", "-O", out_fmt, str(source), str(output)])
    return output


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise H2KError(f"{cmd[0]} {cmd[1]} failed: {proc.stderr.strip() or proc.returncode}")


def remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
