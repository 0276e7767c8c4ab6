"""Checks shared by the libvirt boot tests: what a host that shares no files with the lab may be
given, and that a boot leaves nothing on it. The oracles are the host's own view (the domain XML
libvirtd holds, its pool, its storage directory) and the system's user database."""

from __future__ import annotations

import os
import pwd
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from lab.libvirtd import LibvirtDaemons

ROOT = Path(__file__).resolve().parents[2]
QEMU_USER = pwd.getpwnam("libvirt-qemu")  # Debian's --with-qemu-user: who the host runs QEMU as
# Where a domain's files may be on the host: its pools and state, its own programs and firmware, ptys.
HOST_PREFIXES = ("/var/lib/libvirt/", "/usr/share/", "/usr/bin/", "/dev/pts/", "/run/libvirt/", "/var/log/libvirt/")


def host_paths(xml: str) -> list[str]:
    """Every file name a domain XML gives the host (attributes and element text that are paths)."""
    root = ET.fromstring(xml)
    out = []
    for el in root.iter():
        for key in ("file", "path", "dev", "template"):
            v = el.get(key)
            if v and v.startswith("/"):
                out.append(v)
        if el.tag in ("kernel", "initrd", "loader", "nvram", "emulator") and el.text and el.text.strip():
            out.append(el.text.strip())
    return out


def assert_host_side_only(out: Path) -> None:
    """The domain the host ran named only host-side files: pool volumes, its firmware, its ptys."""
    live = (out / "domain.live.xml").read_text()
    paths = host_paths(live)
    assert paths, live
    stray = [p for p in paths if not p.startswith(HOST_PREFIXES)]
    assert stray == [], f"the host was given paths outside its own directories: {stray}"
    lab_dirs = (str(out.parent), tempfile.gettempdir(), str(ROOT), "/root", "/boot")
    assert not [p for p in paths if p.startswith(lab_dirs)]
    disk = ET.fromstring(live).find("devices/disk[@device='disk']")
    if disk is not None:  # the disk is a volume of the host's h2k pool
        assert disk.get("type") == "volume" and disk.find("source").get("pool") == "h2k"
        assert disk.find("source").get("volume").startswith("h2k-")
    # libvirt's DAC label: QEMU ran as the host's QEMU user, not as root.
    label = ET.fromstring(live).findtext("seclabel[@model='dac']/label") or ""
    uid, _, gid = label.partition(":")
    assert uid == f"+{QEMU_USER.pw_uid}" and gid != "+0", label


def assert_nothing_on_the_host(host: LibvirtDaemons) -> None:
    """No h2k domain, no volume in the h2k pool, no file in its directory on the host."""
    conn = libvirt.open(host.uri)
    try:
        assert [d.name() for d in conn.listAllDomains() if d.name().startswith("h2k-")] == []
        assert conn.storagePoolLookupByName("h2k").listVolumes() == []
    finally:
        conn.close()
    assert os.listdir(host.storage_dir / "h2k") == []
