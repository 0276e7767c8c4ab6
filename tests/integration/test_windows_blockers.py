"""Blocker disks (BitLocker, dynamic disk, Fast Startup) and a dirty SYSTEM hive, on real phony disks.

Each blocker variant costs two launches (``h2k inspect``, ``h2k fix``); the
dirty-hive variant three (fix, rollback of a copy, one read-only launch that
pulls SYSTEM from the source, the fixed and the rolled-back disk). The
dirty-hive disk also carries ghost NICs, checked on the same fix.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import guestfs
import hivex
import pytest

from h2k import accel, hivelog
from h2k.driverpack import open_pack
from h2k.facts import WindowsFacts
from h2k.fix import FixReport, fix_image
from h2k.journal import host_journal_path
from h2k.overlay import convert, sha256_file
from h2k.plan import build_plan
from h2k.registry import decode, find_key, find_value
from h2k.rollback import rollback_image
from lab.testbed import virtio_win, windisk

pytestmark = [pytest.mark.guestfs, pytest.mark.slow]

H2K = [sys.executable, "-m", "h2k"]

# variant -> (blocker words in the one-line cause)
BLOCKERS = {
    "bad-bitlocker": "bitlocker",
    "bad-dynamic": "dynamic",
    "bad-faststartup": "fast startup",
}


@pytest.fixture(scope="session")
def pack_dir() -> Path:
    return virtio_win.build_tree()


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("h2k: error: ")]
    assert len(errors) == 1, stderr
    return errors[0].lower()


def _sector(image: Path, lba: int, tmp: Path) -> bytes:
    """One 512-byte sector of a qcow2, read with qemu-img (no appliance launch; its count is an end, not a length)."""
    out = tmp / f"sector-{lba}"
    subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=512", f"skip={lba}", f"count={lba + 1}",
                    f"if={image}", f"of={out}"], check=True, capture_output=True)
    return out.read_bytes()[:512]


def test_blocker_disks_carry_their_defect(tmp_path) -> None:
    """The test bed wrote what a real disk in that state has, where Windows/Linux look for it."""
    for name in ("bad-bitlocker", "bad-dynamic"):
        r = windisk.VARIANTS[name]
        img = windisk.build(name)
        mbr = _sector(img, 0, tmp_path)
        types = [mbr[446 + 16 * i + 4] for i in range(4)]
        win = next(p for p in windisk.layout(r) if p.role == "windows")
        boot = _sector(img, win.start, tmp_path)
        if name == "bad-dynamic":
            assert types[:2] == [windisk.LDM_MBR_TYPE] * 2 and boot[3:11] == b"NTFS    "
        else:
            assert types[:2] == [0x07, 0x07] and boot[3:11] == windisk.BITLOCKER_OEM_ID
    assert windisk.VARIANTS["bad-faststartup"].hiberboot == 1


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in sorted(BLOCKERS)])
def test_inspect_reports_the_blocker(name) -> None:
    src = windisk.build(name)
    before = sha256_file(src)
    proc = subprocess.run(H2K + ["inspect", str(src)], capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr
    line = _one_error_line(proc.stderr)
    assert BLOCKERS[name] in line
    if name == "bad-faststartup":  # advice that clears it: a full shutdown (not a hybrid one), or no hibernation
        assert "'hibr'" in line and "shutdown /s /t 0" in line and "powercfg /h off" in line
    if name != "bad-bitlocker":  # an encrypted C: cannot be read, so there is no summary to print
        assert "BLOCKER" in proc.stdout and "Windows Server 2019" in proc.stdout, proc.stdout
    assert sha256_file(src) == before


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in sorted(BLOCKERS)])
def test_fix_refuses_with_nothing_left(name, tmp_path, pack_dir) -> None:
    src = windisk.build(name)
    before = sha256_file(src)
    out = tmp_path / "out.qcow2"
    proc = subprocess.run(H2K + ["fix", str(src), "--drivers", str(pack_dir), "--bus", "virtio-blk", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 4, proc.stderr
    assert BLOCKERS[name] in _one_error_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary overlay
    assert sha256_file(src) == before


# ------------------------------------------------------------------ dirty hive

RECIPE = windisk.VARIANTS["dirty-hive"]
PVSCSI = f"{RECIPE.control_set}\\Services\\pvscsi"
VIOSTOR = f"{RECIPE.control_set}\\Services\\viostor"


@dataclass
class Dirty:
    source: Path
    source_sha: str
    report: FixReport
    facts: WindowsFacts
    hives: dict[str, Path]  # label -> local SYSTEM
    backup: bytes  # the in-guest backup of SYSTEM on the fixed disk
    network_script: str  # the staged first-boot script that re-applies static IPs
    logs: dict[str, bytes]  # SYSTEM.LOG1/.LOG2 of the source disk
    rollback: object


def _dword(path: Path, key: str, name: str) -> int | None:
    h = hivex.Hivex(str(path))
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    return None if got is None else decode(*got)


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, pack_dir) -> Dirty:
    src = windisk.build("dirty-hive")
    sha = sha256_file(src)
    tmp = tmp_path_factory.mktemp("dirty")
    pack = open_pack(pack_dir)
    fixed = tmp / "fixed.qcow2"
    report = fix_image(src, lambda f: build_plan(f, pack, "virtio-blk"), output=fixed)
    rolled = convert(fixed, tmp / "rolled.qcow2")
    shutil.copyfile(report.journal, host_journal_path(rolled, report.run_id))  # the copy keeps its journal beside it
    rb = rollback_image(rolled)

    backup_rel = next(h.backup_path for h in report_journal(report).hives if h.name == "SYSTEM")
    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    images = {"source": src, "fixed": fixed, "rolled": rolled}
    for img in images.values():
        g.add_drive_opts(str(img), readonly=1)
    g.launch()
    hives: dict[str, Path] = {}
    try:
        for (label, _), disk in zip(images.items(), g.list_devices()):
            mp = f"/{label}"
            g.mkmountpoint(mp)
            g.mount_ro(f"{disk}2", mp)
            hives[label] = tmp / f"SYSTEM.{label}"
            g.download(g.case_sensitive_path(f"{mp}/Windows/System32/config/SYSTEM"), str(hives[label]))
        backup = g.read_file(g.case_sensitive_path(f"/fixed{backup_rel}"))
        script = next(p for p in report.files_written if p.endswith("h2k-network.ps1"))
        network = g.read_file(g.case_sensitive_path(f"/fixed{script}")).decode("ascii")
        logs = {n: g.read_file(g.case_sensitive_path(f"/source/Windows/System32/config/SYSTEM.{n}"))
                for n in ("LOG1", "LOG2")}
    finally:
        g.close()
    return Dirty(src, sha, report, WindowsFacts.from_dict(report.facts), hives, backup, network, logs, rb)


def report_journal(report: FixReport):
    from h2k.journal import Journal

    return Journal.load(report.journal)


@pytest.mark.xdist_group("dirty-hive")
def test_source_primary_is_stale_without_the_log(dirty: Dirty) -> None:
    """The test bed itself: hivex alone reads the stale value from the dirty primary."""
    base = hivelog.read_base_block(dirty.hives["source"].read_bytes())
    assert base is not None and base.dirty and base.seq1 != base.seq2
    assert _dword(dirty.hives["source"], PVSCSI, "Start") == 3


@pytest.mark.xdist_group("dirty-hive")
def test_source_logs_are_as_windows_writes_them(dirty: Dirty) -> None:
    """Read with guestfs from the built disk, checked with struct against the specification (not the reader):
    entry n = the primary's secondary sequence number in .LOG1, n+1 in .LOG2 after the switch, Windows' hash seed."""
    primary = dirty.hives["source"].read_bytes()
    seq2 = struct.unpack_from("<I", primary, 8)[0]
    assert seq2 == windisk.DIRTY_SEQ
    for name, first in (("LOG1", seq2), ("LOG2", seq2 + 1)):
        log = dirty.logs[name]
        assert log[:4] == b"regf" and struct.unpack_from("<III", log, 4)[:2] == (first, first)
        assert struct.unpack_from("<I", log, 28)[0] == 6 and log[512:516] == b"HvLE"
        size, _flags, seq = struct.unpack_from("<III", log, 516)
        assert seq == first
        assert struct.unpack_from("<Q", log, 512 + 24)[0] == hivelog.marvin32(log[512 + 40 : 512 + size], 0x82EF4D887A4E55C5)
        assert struct.unpack_from("<Q", log, 512 + 32)[0] == hivelog.marvin32(log[512 : 512 + 32], 0x82EF4D887A4E55C5)


@pytest.mark.xdist_group("dirty-hive")
def test_inspection_read_the_replayed_hive(dirty: Dirty) -> None:
    assert len(dirty.facts.replayed_hives) == 1 and dirty.facts.replayed_hives[0].startswith("SYSTEM:")
    seq = windisk.DIRTY_SEQ
    assert f"replayed SYSTEM.LOG1, SYSTEM.LOG2 entries {seq}..{seq + 1}" in dirty.facts.replayed_hives[0]
    pvscsi = next(s for s in dirty.facts.storage_drivers if s.name.lower() == "pvscsi")
    assert pvscsi.start == 0  # the logged value, not the primary's 3
    assert not dirty.facts.blockers


@pytest.mark.xdist_group("dirty-hive")
def test_fix_edits_the_replayed_hive(dirty: Dirty) -> None:
    fixed = dirty.hives["fixed"]
    base = hivelog.read_base_block(fixed.read_bytes())
    assert base is not None and not base.dirty  # Windows will ignore the already-applied log entries
    assert _dword(fixed, PVSCSI, "Start") == 0  # replayed value kept (the plan does not touch pvscsi)
    assert _dword(fixed, VIOSTOR, "Start") == 0 and _dword(fixed, VIOSTOR, "Type") == 1
    # The backup in the guest is the dirty primary exactly as it was.
    assert hivelog.read_base_block(dirty.backup).dirty
    assert dirty.backup == dirty.hives["source"].read_bytes()
    record = next(h for h in report_journal(dirty.report).hives if h.name == "SYSTEM")
    assert record.replayed_logs and "SYSTEM.LOG1, SYSTEM.LOG2" in record.replayed_logs[0]


@pytest.mark.xdist_group("dirty-hive")
def test_ghost_nics_are_reported_and_their_static_ips_left_behind(dirty: Dirty) -> None:
    """Only the live vmxnet3's interface is re-applied; the gone e1000, the unplugged USB NIC and the interface
    whose adapter was uninstalled are reported as ghosts (their addresses read with hivex from the source too)."""
    assert [n.addresses for n in dirty.facts.nics if not n.dhcp] == [[RECIPE.ip_address]]
    ghosts = " | ".join(dirty.facts.ghost_interfaces)
    for address, why in (("10.20.30.40", "before the last boot"), ("172.16.5.5", "was removed"),
                         ("10.99.1.1", "no network adapter")):
        line = next(g for g in dirty.facts.ghost_interfaces if f" {address}:" in g)
        assert why in line, ghosts
    interfaces = f"{RECIPE.control_set}\\Services\\Tcpip\\Parameters\\Interfaces"
    source = hivex.Hivex(str(dirty.hives["source"]))
    listed = [source.node_name(c) for c in source.node_children(find_key(source, interfaces))]
    assert "{0e7a9c41-5b2d-4f63-8a1e-9d4c7b2f6e10}" in listed  # the ghost is really in the hive
    assert RECIPE.ip_address in dirty.network_script
    assert not any(a in dirty.network_script for a in ("10.20.30.40", "172.16.5.5", "10.99.1.1"))


@pytest.mark.xdist_group("dirty-hive")
def test_rollback_restores_the_dirty_primary(dirty: Dirty) -> None:
    assert dirty.hives["rolled"].read_bytes() == dirty.hives["source"].read_bytes()
    assert sha256_file(dirty.source) == dirty.source_sha

