"""``qemu-img convert`` done carefully: progress, sparse output, space check, checksum, no partial output.

* The source format is always passed with ``-f`` (probing raw is unsafe, and
  qemu-img would read a fixed VHD as raw); the source is opened read-only by
  qemu-img convert and is never a possible output (checked against every file
  of the chain, extents included).
* ``qemu-img measure`` gives the bytes the output needs; the output's file
  system must have them free before anything is written.
* Output goes to a hidden temporary file next to OUT and is renamed into
  place only after qemu-img succeeded, the SHA-256 was taken and the file was
  fsynced; any failure (full disk, Ctrl-C, SIGTERM) removes it and stops
  qemu-img.
* Zeroes are not written (``-S 4k``, qemu-img's default made explicit), so
  raw output is sparse and qcow2 output only holds allocated clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from h2k.errors import H2KError, InputError
from h2k.image import DiskImage, as_image
from h2k.overlay import sha256_file
from h2k.progress import Progress

OUT_FORMATS = {".qcow2": "qcow2", ".raw": "raw", ".img": "raw"}
SPACE_MARGIN = 16 << 20  # metadata rounding, the file system's own overhead


@dataclass
class ConvertResult:
    source: str
    output: str
    format: str
    virtual_size: int
    bytes_on_disk: int
    sha256: str  # "" when the checksum was skipped (--no-checksum)
    seconds: float  # all of it: probe, measure, qemu-img, checksum
    chain: list[str]
    qemu_seconds: float = 0.0  # the qemu-img convert run alone
    checksum_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def out_format(output: str | Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in ("qcow2", "raw"):
            raise InputError(f"output format must be qcow2 or raw, not {fmt!r}")
        return fmt
    return OUT_FORMATS.get(Path(output).suffix.lower(), "qcow2")


def required_bytes(chain: DiskImage, fmt: str) -> int:
    """What the output will take at most, from ``qemu-img measure`` over the whole chain."""
    top = chain.top
    proc = subprocess.run(
        ["qemu-img", "measure", "--output=json", "-f", top.format, "-O", fmt, top.path],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("qemu-img: ")
        raise InputError(f"{top.path}: qemu-img cannot read it ({reason})")
    return int(json.loads(proc.stdout)["required"])


def check_space(directory: Path, need: int) -> None:
    free = shutil.disk_usage(directory).free
    if need + SPACE_MARGIN > free:
        raise InputError(f"not enough free space in {directory}: the output needs {need / 2**20:.0f} MiB "
                         f"(+{SPACE_MARGIN >> 20} MiB margin), {free / 2**20:.0f} MiB free")


def convert_disk(
    source: DiskImage | str | Path,
    output: str | Path,
    *,
    fmt: str | None = None,
    flatten: bool = True,
    progress: Progress | None = None,
    on_percent: Callable[[float], None] | None = None,
    checksum: bool = True,
) -> ConvertResult:
    """Convert ``source`` (any readable format, chains followed) into a standalone ``output``."""
    t0 = time.monotonic()
    chain = as_image(source)  # the front door (a DiskImage passes as it is)
    if chain.is_chain and not flatten:
        raise InputError(f"{source} is a snapshot chain of {len(chain.layers)} layers; pass --flatten to merge it into one disk")
    fmt = out_format(output, fmt)
    output = Path(output).absolute()
    if output.exists() or output.is_symlink():
        raise InputError(f"{output}: already exists; remove it or choose another output")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")
    inputs = {os.path.realpath(f) for f in chain.files()}
    if os.path.realpath(output) in inputs:
        raise InputError(f"{output}: is part of the source; h2k never writes its input")
    check_space(output.parent, required_bytes(chain, fmt))
    tmp = output.with_name(f".{output.name}.h2k-part-{os.getpid()}")
    cmd = ["qemu-img", "convert", "-p", "-S", "4k", "-f", chain.top.format, "-O", fmt]
    if fmt == "qcow2":
        cmd += ["-o", "compat=1.1"]
    cmd += [chain.top.path, str(tmp)]
    try:
        t1 = time.monotonic()
        _run_with_progress(cmd, progress, on_percent)
        t2 = time.monotonic()
        digest = sha256_file(tmp) if checksum else ""
        t3 = time.monotonic()
        sync_and_rename(tmp, output)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    st = output.stat()
    return ConvertResult(
        source=chain.top.path, output=str(output), format=fmt, virtual_size=chain.top.virtual_size,
        bytes_on_disk=st.st_blocks * 512, sha256=digest, seconds=time.monotonic() - t0,
        chain=[layer.path for layer in chain.layers], qemu_seconds=t2 - t1, checksum_seconds=t3 - t2,
    )


def sync_and_rename(tmp: Path, output: Path) -> None:
    """fsync ``tmp`` (its data on disk before its name says it is complete), rename it to ``output``, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, output)
    dfd = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _run_with_progress(cmd: list[str], progress: Progress | None, on_percent: Callable[[float], None] | None) -> None:
    """Run qemu-img convert -p, turning its "(NN.NN/100%)" updates into progress steps every 10 %."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    next_mark = 10.0
    buf = b""
    try:
        while True:
            chunk = proc.stdout.read1(4096) if hasattr(proc.stdout, "read1") else proc.stdout.read(64)
            if not chunk:
                break
            buf += chunk
            *done, buf = buf.replace(b"\n", b"\r").split(b"\r")
            for piece in done:
                pct = parse_percent(piece.decode(errors="replace"))
                if pct is None:
                    continue
                if on_percent:
                    on_percent(pct)
                while progress is not None and pct >= next_mark:
                    progress.step(f"{next_mark:.0f}% converted")
                    next_mark += 10.0
        err = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        last = (err.strip().splitlines() or [""])[-1].removeprefix("qemu-img: ")
        if rc < 0:
            import signal

            if -rc == signal.SIGINT:  # Ctrl-C reached qemu-img too (same process group): an interrupt, not a failure
                raise KeyboardInterrupt
            last = last or f"killed by {signal.Signals(-rc).name}"
            if -rc == signal.SIGXFSZ:
                last = "the output file hit the file size limit (SIGXFSZ)"
        if "No space left" in last or "ENOSPC" in last:
            last = f"the disk filled up: {last}"
        raise H2KError(f"qemu-img convert failed: {last or f'exit {rc}'}; no output was left behind")


def parse_percent(text: str) -> float | None:
    """``"    (42.17/100%)"`` -> 42.17."""
    text = text.strip()
    if text.startswith("(") and text.endswith("/100%)"):
        try:
            return float(text[1:-6])
        except ValueError:
            return None
    return None
