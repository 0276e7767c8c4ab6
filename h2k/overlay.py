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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from h2k.errors import H2KError, InputError
from h2k.image import DiskImage, as_image, overlay_on

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


def default_overlay(image: str | Path) -> Path:
    image = Path(image)
    return image.with_name(image.name + OVERLAY_SUFFIX)


def create_overlay(source: DiskImage | str | Path, overlay: str | Path) -> DiskImage:
    """A qcow2 overlay whose backing file is ``source`` (opened through the front door; format pinned)."""
    return overlay_on(as_image(source), overlay)


def convert(source: DiskImage | str | Path, output: str | Path) -> Path:
    """A standalone copy of ``source`` (which may be an overlay) at ``output``: raw for .raw/.img, else qcow2.

    Written as a temporary file beside ``output`` (after checking the free space for
    it), synced, then renamed: ``output`` is whole or absent, never a truncated file
    that looks valid, whatever stops the copy (a full disk, Ctrl-C, SIGTERM).
    """
    from h2k.inputs.convert import check_space, sync_and_rename

    source = as_image(source)
    output = Path(output)
    out_fmt = "raw" if output.suffix.lower() in (".raw", ".img") else "qcow2"
    check_space(output.parent, measure(source, out_fmt))
    tmp = output.with_name(f".{output.name}.h2k-part-{os.getpid()}")
    try:
        _run(["qemu-img", "convert", "-q", "-f", source.format, "-O", out_fmt, source.path, str(tmp)])
        sync_and_rename(tmp, output)
    finally:
        remove(tmp)
    return output


def measure(source: DiskImage | str | Path, out_fmt: str) -> int:
    """Bytes a standalone ``out_fmt`` copy of ``source`` needs at most (``qemu-img measure``, format pinned)."""
    source = as_image(source)
    proc = subprocess.run(["qemu-img", "measure", "--output=json", "-f", source.format, "-O", out_fmt, source.path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise H2KError(f"qemu-img measure {source}: {proc.stderr.strip() or proc.returncode}")
    return int(json.loads(proc.stdout)["required"])


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise H2KError(f"{cmd[0]} {cmd[1]} failed: {proc.stderr.strip() or proc.returncode}")


def remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class FixTarget:
    """The disk a fix works on (``work``, opened as ``disk``) and the one it leaves (``final``)."""

    final: Path
    work: Path
    disk: DiskImage
    source: DiskImage  # the image given, as the front door opened it


@contextmanager
def fix_target(image: str | Path, output: str | Path | None, in_place: bool) -> Iterator[FixTarget]:
    """Set up where a fix writes, for the Windows engine and the Linux pipeline alike.

    In place: the image itself. Otherwise a temporary overlay next to the result, which on
    success becomes the default overlay (renamed) or ``output`` (flattened by qemu-img
    convert); on any failure it is removed, so a refused fix leaves nothing behind.
    """
    source = as_image(image)  # the front door: a bad or hostile image -> InputError before anything is created
    image = Path(source.given)
    if in_place and output is not None:
        raise InputError("--in-place and -o/--output exclude each other")
    if in_place:
        yield FixTarget(image, image, source, source)
        return
    final = Path(output) if output is not None else default_overlay(image)
    if final.exists():  # the image itself included: -o never overwrites
        raise InputError(f"{final} already exists; remove it or choose another -o")
    if not final.absolute().parent.is_dir():
        raise InputError(f"{final}: no such folder {final.absolute().parent}")
    if output is not None:  # the copy will need about the source's size: fail now, not after the fix
        from h2k.inputs.convert import check_space

        check_space(final.absolute().parent, measure(source, "raw" if final.suffix.lower() in (".raw", ".img")
                                                      else "qcow2"))
    work = final.with_name(f".{final.name}.h2k-tmp-{os.getpid()}.qcow2")
    target = FixTarget(final, work, overlay_on(source, work), source)
    try:
        yield target
        if output is not None:
            convert(target.disk, final)
        else:
            from h2k.inputs.convert import sync_and_rename

            sync_and_rename(target.work, final)  # on disk before it has its name
            target.work = final
    finally:
        if target.work != final:
            remove(target.work)
