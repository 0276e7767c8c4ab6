"""A boot's files on a libvirt host that shares no file system with the lab.

Every file a domain needs (its disk, CD-ROMs, a direct-boot kernel and initramfs, a
kept UEFI NVRAM) is uploaded through libvirt's storage API into a volume of one
storage pool on the host (``storageVolCreateXML`` + ``virStorageVolUpload`` over a
sparse stream), so the domain XML names only that pool's volumes and paths. The
NVRAM comes back with ``virStorageVolDownload``. Every volume a boot made is deleted
when it ends.

The pool is ``h2k``: one the host's administrator defined (anywhere), or else a
transient directory pool the lab creates at ``/var/lib/libvirt/images/h2k``; it stays
(empty) after the boots, like libvirt's ``default`` pool.

A disk whose image is a single qcow2 or raw file is uploaded as it is; anything else
(a backing chain such as the lab's or the matrix's overlays, other formats, an external
data file) is first flattened to one local qcow2 with ``qemu-img convert``. Each boot
uploads its own copy: the cost is the disk's allocated size over the wire, per boot (per
run for a two-phase run, whose phases share one volume).
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import libvirt

from h2k.errors import H2KError, InputError
from lab.libvirt_streams import blocking_stream

POOL_NAME = "h2k"
POOL_PATH = "/var/lib/libvirt/images/h2k"
UPLOADABLE = ("qcow2", "raw")


def ensure_pool(conn: "libvirt.virConnect", name: str = POOL_NAME, path: str = POOL_PATH) -> "libvirt.virStoragePool":
    """The host's pool ``name``, started if inactive, or a new transient directory pool at ``path``."""
    for attempt in range(2):
        try:
            pool = conn.storagePoolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise
        else:
            if not pool.isActive():
                try:
                    pool.create(0)
                except libvirt.libvirtError:
                    if not pool.isActive():  # another boot started it meanwhile
                        raise
            return pool
        root = ET.Element("pool", type="dir")
        ET.SubElement(root, "name").text = name
        ET.SubElement(ET.SubElement(root, "target"), "path").text = path
        try:
            return conn.storagePoolCreateXML(ET.tostring(root, encoding="unicode"),
                                             libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        except libvirt.libvirtError:
            if attempt:  # a concurrent boot made it between our lookup and create: look again once
                raise
    raise AssertionError("unreachable")


def pool_dir(pool: "libvirt.virStoragePool") -> str:
    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise H2KError(f"libvirt pool {pool.name()} has no target path (not a directory pool?)")
    return path


@dataclass(frozen=True)
class ImageShape:
    format: str
    chain: int  # images in the backing chain, this one included
    data_file: bool


def image_shape(image: Path) -> ImageShape:
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", "-U", str(image)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise InputError(f"{image}: not a disk image qemu-img can read: {exc.stderr.strip()[:200]}") from None
    chain = json.loads(out)
    top = chain[0]
    data = ((top.get("format-specific") or {}).get("data") or {})
    return ImageShape(top["format"], len(chain), bool(data.get("data-file")))


def needs_flattening(shape: ImageShape) -> bool:
    return shape.format not in UPLOADABLE or shape.chain > 1 or shape.data_file


def flatten(image: Path, dest: Path) -> Path:
    """One self-contained qcow2 with everything the chain holds (read with force-share: others may boot it)."""
    proc = subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(image), str(dest)],
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise H2KError(f"qemu-img convert {image}: {proc.stderr.strip()[:300]}")
    return dest


# --------------------------------------------------------------------------------------
# Sparse stream handlers (libvirt calls them on the uploading thread)

def _read(stream: Any, nbytes: int, fh: BinaryIO) -> bytes:
    return fh.read(nbytes)


def _hole(stream: Any, fh: BinaryIO) -> list[Any]:
    """[in_data, length] of the section at the current offset (SEEK_DATA/SEEK_HOLE)."""
    fd = fh.fileno()
    cur = fh.tell()
    try:
        data = os.lseek(fd, cur, os.SEEK_DATA)
    except OSError:  # ENXIO: only a hole (or nothing) is left
        end = os.lseek(fd, 0, os.SEEK_END)
        fh.seek(cur)
        return [False, end - cur]
    if data > cur:
        fh.seek(cur)
        return [False, data - cur]
    hole = os.lseek(fd, cur, os.SEEK_HOLE)
    fh.seek(cur)
    return [True, hole - cur]


def _skip(stream: Any, length: int, fh: BinaryIO) -> int:
    fh.seek(length, os.SEEK_CUR)
    return 0


def _sink(stream: Any, data: bytes, fh: BinaryIO) -> int:
    return fh.write(data)


class BootVolumes:
    """The volumes of one boot in the host's ``h2k`` pool: upload, download, delete them all."""

    def __init__(self, conn: "libvirt.virConnect", tag: str, pool_name: str = POOL_NAME, pool_path: str = POOL_PATH) -> None:
        self.conn = conn
        self.tag = tag
        self.pool = ensure_pool(conn, pool_name, pool_path)
        self.dir = pool_dir(self.pool)
        self.names: list[str] = []  # volumes this boot made (or had libvirt make), to delete
        self.uploads: list[tuple[str, str, int]] = []  # (local file, volume, bytes)
        self.bytes_sent = 0

    def name(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def path(self, name: str) -> str:
        """The host-side path of a volume in this pool (for XML elements that take no volume)."""
        return f"{self.dir}/{name}"

    def upload(self, local: Path, role: str) -> str:
        """Upload ``local`` (sparse) into a new volume; returns the volume's name."""
        name = self.name(role)
        size = os.path.getsize(local)
        vol_xml = ET.Element("volume")
        ET.SubElement(vol_xml, "name").text = name
        ET.SubElement(vol_xml, "capacity", unit="bytes").text = str(size)
        ET.SubElement(vol_xml, "allocation", unit="bytes").text = "0"
        # raw: libvirt writes no header of its own; the uploaded bytes are the file (a qcow2 stays a qcow2).
        ET.SubElement(ET.SubElement(vol_xml, "target"), "format", type="raw")
        vol = self.pool.createXML(ET.tostring(vol_xml, encoding="unicode"), 0)
        self.names.append(name)
        with blocking_stream(self.conn) as stream:
            vol.upload(stream, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
            with open(local, "rb", buffering=0) as fh:  # unbuffered: _hole moves the fd's offset itself
                stream.sparseSendAll(_read, _hole, _skip, fh)
        self.bytes_sent += size
        self.uploads.append((str(local), name, size))
        return name

    def expect(self, role: str) -> str:
        """A volume libvirt itself will create (an NVRAM from its template): deleted with the others."""
        name = self.name(role)
        self.names.append(name)
        return name

    def download(self, name: str, local: Path) -> None:
        """Fetch a volume into ``local`` (written beside it, then renamed)."""
        self.pool.refresh(0)  # a file libvirt made in the pool's directory becomes a volume
        vol = self.pool.storageVolLookupByName(name)
        tmp = local.with_name(local.name + ".h2k-part")
        try:
            with blocking_stream(self.conn) as stream:
                vol.download(stream, 0, 0, 0)
                with open(tmp, "wb") as fh:
                    stream.recvAll(_sink, fh)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def delete_all(self) -> list[str]:
        """Delete every volume of this boot; returns the names that could not be deleted."""
        left = []
        try:
            self.pool.refresh(0)
        except libvirt.libvirtError:
            pass
        for name in self.names:
            try:
                self.pool.storageVolLookupByName(name).delete(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    left.append(name)
        self.names = [n for n in self.names if n in left]
        return left
