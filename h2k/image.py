"""The front door: every disk image h2k, the lab and the matrix open comes through :func:`open_image`.

A disk image is untrusted input: its metadata can name other files that QEMU
would open on the host (a qcow2 backing file, a qcow2 external data file, VMDK
extents, a VMDK parent), and QEMU accepts ``json:{...}`` pseudo-file names and
protocol names (``nbd:``, ``http:``, ``file:`` ...) there. A crafted image could
thus make h2k read a host file or device into the disk it converts or inspects
(OpenStack's CVE-2022-47951 and CVE-2024-32498 are this class). So, once per
image and before any qemu-img, libguestfs or QEMU process sees it:

1. the format of the given file is decided by h2k from its first bytes (a
   known magic, a VMDK descriptor, a VHD footer, else raw) -- never left to
   QEMU's probe; a file QEMU would probe as another format, or a format h2k does
   not support, is refused;
2. every file the image names is read from its header by h2k itself (the qcow2
   header and extensions, the VMDK descriptor) and refused when it is a
   ``json:`` or protocol name, resolves (symlinks followed) outside the image's
   folder, is not a regular file, or is an external data file; a backing file
   whose format is not recorded must not look like raw (QEMU would guess);
3. only then ``qemu-img info --output=json --backing-chain -f FMT`` runs, and
   its view of every layer (file, format, backing, data file) must match h2k's.

The result is a :class:`DiskImage` (the chain, top first, each layer with its
format and files) that later stages take; from there on the format is passed
explicitly (qemu-img ``-f``/``-F``, libguestfs ``format=``, QEMU ``-blockdev``
with ``driver=``). Any refusal is an :class:`InputError` naming the image and the
reason (exit 3).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from h2k.errors import H2KError, InputError
from h2k.inputs import formats, qcow2
from h2k.inputs.formats import DiskInfo

SUPPORTED_FORMATS = ("qcow2", "raw", "vmdk", "vpc", "vhdx")
MAX_DEPTH = 64  # VMware allows 32 snapshots; a loop or a crafted chain stops here
QEMU_IMG_TIMEOUT = 120


@dataclass(frozen=True)
class DiskImage:
    """An image that passed the front door: the chain top (the disk given) to base, formats pinned.

    It stands in for its top file's path (``os.fspath``, ``str``), so code that only needs the
    path can take it as one; code that opens the image takes the format from here.
    """

    given: str  # what the caller passed (for messages)
    layers: tuple[DiskInfo, ...]  # [0] the disk given, [-1] the base

    @property
    def top(self) -> DiskInfo:
        return self.layers[0]

    @property
    def path(self) -> str:
        return self.layers[0].path

    @property
    def format(self) -> str:
        return self.layers[0].format

    @property
    def virtual_size(self) -> int:
        return self.layers[0].virtual_size

    @property
    def is_chain(self) -> bool:
        return len(self.layers) > 1

    def files(self) -> list[str]:
        """Every host file the image consists of (all layers, VMDK extents included)."""
        return [f for layer in self.layers for f in layer.files]

    def describe(self) -> str:
        lines = []
        for depth, d in enumerate(self.layers):
            kind = d.format + (f"/{d.subformat}" if d.subformat else "")
            role = "top" if depth == 0 else ("base" if depth == len(self.layers) - 1 else "layer")
            lines.append(f"{'  ' * depth}{role}: {d.path} ({kind}, {d.virtual_size / 2**30:.2f} GiB)")
        return "\n".join(lines)

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return {"given": self.given, "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiskImage":
        """Rebuild an image h2k opened itself (e.g. handed to a child process); never for user data."""
        return cls(given=data["given"], layers=tuple(DiskInfo(**layer) for layer in data["layers"]))


def as_image(image: "DiskImage | str | os.PathLike[str]") -> DiskImage:
    """``image`` if it already passed the front door, else open it through it."""
    return image if isinstance(image, DiskImage) else open_image(image)


# ------------------------------------------------------------------ names inside images


def has_protocol(name: str) -> bool:
    """QEMU's rule (``path_has_protocol``): a ':' before any '/' makes a protocol or json: name."""
    for ch in name:
        if ch == "/":
            return False
        if ch == ":":
            return True
    return False


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root and path != root


def confined_file(name: str, relative_to: str, root: str, where: str, what: str) -> str:
    """The real path of a file an image names, or InputError if it may not be opened.

    ``name`` is resolved as QEMU resolves it (relative to the directory of the file naming
    it), then symlinks are followed; the result must be a regular file inside ``root``.
    """
    if name.startswith("json:"):
        raise InputError(f"{where}: {what} {name[:120]!r} is a QEMU json: specification, not a file name: "
                         "refused (it can open any host file or device)")
    if has_protocol(name):
        raise InputError(f"{where}: {what} {name[:120]!r} names a QEMU protocol "
                         f"({name.split(':', 1)[0]}:), not a file: refused")
    joined = name if os.path.isabs(name) else os.path.join(os.path.dirname(relative_to), name)
    real = os.path.realpath(joined)
    if not _inside(real, root):
        raise InputError(f"{where}: {what} {name[:120]!r} resolves to {real}, outside the image's folder "
                         f"{root}: refused (keep every file of the image in its folder)")
    if not os.path.lexists(real):
        raise InputError(f"{where}: missing {what} {name!r}")
    if not os.path.isfile(real):
        raise InputError(f"{where}: {what} {name!r} is not a regular file (a device or directory): refused")
    return real


# ------------------------------------------------------------------ one layer, read by h2k


@dataclass
class _Layer:
    info: DiskInfo
    backing_name: str | None = None
    backing_format: str | None = None  # as recorded by the layer (None: not recorded)


def _read_layer(path: str, root: str, pinned: str | None, where: str) -> _Layer:
    """What ``path`` is and which files it names, from its own bytes; nothing else is opened."""
    kind = formats.sniff(path)
    fmt = formats.SNIFFED_FORMATS.get(kind)
    if fmt is None:
        raise InputError(formats.refusal(Path(path), kind))
    if pinned is not None and pinned != fmt:
        raise InputError(f"{where}: {path} is recorded as {pinned} by the image above it, but its content is "
                         f"{fmt}: refused (QEMU and h2k would read it differently)")
    info = DiskInfo(path=path, format=fmt, virtual_size=0, files=[path])
    layer = _Layer(info)
    if fmt == "qcow2":
        head = qcow2.read_header(path)
        if head.external_data or head.data_file:
            raise InputError(f"{where}: qcow2 image with an external data file "
                             f"{head.data_file or '(unnamed)'!r}: refused (its data would come from another host file)")
        if head.encrypted:
            raise InputError(f"{where}: encrypted qcow2 images are not supported")
        layer.backing_name, layer.backing_format = head.backing_file, head.backing_format
    elif fmt == "vmdk":
        desc, files = formats.check_vmdk(path, confine=lambda name: confined_file(
            name, path, root, where, "extent file"))
        info.subformat, info.files = desc.create_type, files
        layer.backing_name = desc.parent_hint  # QEMU opens the hint whatever parentCID says
    elif fmt == "vpc":
        info.subformat = formats.vhd_subformat(Path(path))
    elif fmt == "raw":
        formats.check_raw(Path(path))
    return layer


# ------------------------------------------------------------------ the front door


def open_image(path: str | os.PathLike[str]) -> DiskImage:
    """Open a disk image safely (see the module's docstring); InputError naming the image otherwise."""
    given = os.fspath(path)
    if not os.path.lexists(given):
        raise InputError(f"{given}: no such file")
    real = os.path.realpath(given)
    if os.path.isdir(real):
        raise InputError(f"{given}: is a directory, not a disk image")
    if not os.path.isfile(real):
        raise InputError(f"{given}: not a regular file (a device, socket or dangling link): refused")
    if os.path.getsize(real) == 0:
        raise InputError(f"{given}: empty file, not a disk image")
    root = os.path.dirname(real)
    layers: list[_Layer] = []
    seen: set[str] = set()
    current, pinned = real, None
    while True:
        if len(layers) >= MAX_DEPTH:
            raise InputError(f"{given}: snapshot chain deeper than {MAX_DEPTH} layers")
        if current in seen:
            raise InputError(f"{given}: snapshot chain loops back to {current}")
        seen.add(current)
        layer = _read_layer(current, root, pinned, given)
        layers.append(layer)
        if layer.backing_name is None:
            break
        what = "backing file" if layer.info.format == "qcow2" else "parent disk"
        nxt = confined_file(layer.backing_name, current, root, given, what)
        if layer.backing_format is not None and layer.backing_format not in SUPPORTED_FORMATS:
            raise InputError(f"{given}: {what} {layer.backing_name!r} is recorded as {layer.backing_format!r}, "
                             f"not a format h2k reads ({', '.join(SUPPORTED_FORMATS)})")
        if layer.backing_format is None and formats.sniff(nxt) == "raw":
            raise InputError(f"{given}: {what} {layer.backing_name!r} has no recorded format and looks like raw "
                             "data: QEMU would have to guess: refused (record it with "
                             "'qemu-img rebase -u -F raw -b NAME IMAGE' if it really is raw)")
        layer.info.backing = nxt
        current, pinned = nxt, layer.backing_format
    _confirm_with_qemu_img(given, layers)
    for layer in layers:  # a qcow2 cut short would read (and convert "successfully") as zeros
        if layer.info.format == "qcow2":
            check_intact(given, layer.info.path, layer.info.format)
    return DiskImage(given=given, layers=tuple(layer.info for layer in layers))


def _confirm_with_qemu_img(given: str, layers: list[_Layer]) -> None:
    """One ``qemu-img info --backing-chain`` with the format pinned; its view must match ours."""
    top = layers[0].info
    cmd = ["qemu-img", "info", "--output=json", "--backing-chain", "-U", "-f", top.format, top.path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except FileNotFoundError:
        raise H2KError("qemu-img not found (install the qemu-utils package)") from None
    except subprocess.TimeoutExpired:
        raise InputError(f"{given}: qemu-img info did not answer within {QEMU_IMG_TIMEOUT}s") from None
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["unreadable"])[-1].removeprefix("qemu-img: ")
        raise InputError(f"{given}: qemu-img cannot read it ({reason})")
    try:
        seen = json.loads(proc.stdout)
    except ValueError:
        raise H2KError(f"{given}: qemu-img info printed no JSON") from None
    if len(seen) != len(layers):
        raise InputError(f"{given}: qemu-img sees {len(seen)} layer(s) where h2k sees {len(layers)}: refused")
    parent_dir = os.path.dirname(top.path)
    for layer, info in zip(layers, seen):
        d = layer.info
        name = info.get("filename", "")
        real = os.path.realpath(name if os.path.isabs(name) else os.path.join(parent_dir, name))
        specific = (info.get("format-specific") or {}).get("data") or {}
        if real != d.path or info.get("format") != d.format:
            raise InputError(f"{given}: qemu-img sees {name} as {info.get('format')}, h2k sees {d.path} as "
                             f"{d.format}: refused")
        if specific.get("data-file"):
            raise InputError(f"{given}: qemu-img reports an external data file {specific['data-file']!r}: refused")
        if bool(info.get("backing-filename")) != (layer.backing_name is not None):
            raise InputError(f"{given}: qemu-img and h2k disagree on whether {d.path} has a backing file: refused")
        if d.format == "vhdx" and specific.get("parent"):
            raise InputError(f"{given}: differencing VHDX (AVHDX); merge the checkpoint in Hyper-V first")
        d.virtual_size = int(info["virtual-size"])
        d.actual_size = info.get("actual-size")
        parent_dir = os.path.dirname(d.path)


def check_intact(given: str, path: str, fmt: str) -> None:
    """``qemu-img check``: corruption (exit 2) is bad input; leaked clusters (exit 3, e.g. after a crash)
    are harmless."""
    cmd = ["qemu-img", "check", "-q", "-U", "-f", fmt, path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise InputError(f"{given}: qemu-img check did not finish within {QEMU_IMG_TIMEOUT}s") from None
    if proc.returncode in (0, 3):
        return
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith("ERROR")), lines[0] if lines else f"exit {proc.returncode}")
    where = "" if os.path.realpath(given) == path else f" ({path})"
    raise InputError(f"{given}{where}: corrupt or truncated {fmt} image (qemu-img check: {first})")


def overlay_on(base: DiskImage, dest: str | os.PathLike[str]) -> DiskImage:
    """A new qcow2 overlay at ``dest`` over ``base`` (backing format pinned), as an opened image.

    The overlay is h2k's own file, so its chain is known without reading it back: ``dest``
    over ``base``'s layers. QEMU writes only the overlay.
    """
    dest = os.path.abspath(dest)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", base.format, "-b", base.path, dest]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT)
    if proc.returncode != 0:
        raise H2KError(f"qemu-img create (overlay on {base.path}) failed: {proc.stderr.strip() or proc.returncode}")
    real = os.path.realpath(dest)
    top = DiskInfo(path=real, format="qcow2", virtual_size=base.virtual_size, backing=base.path, files=[real])
    return DiskImage(given=dest, layers=(top, *base.layers))
