"""The Windows engine on every phony test-bed disk: real libguestfs, real hivex, the fake virtio-win pack.

Per valid variant, five appliance launches shared by all asserts (module-scoped):
fix (-o copy, --ems), a second fix --in-place on a copy of the result (must find
nothing to do), rollback of a copy, one launch that pulls the hives/BCD of all
four disks for the hivex asserts, and ``h2k verify``. Bad variants: one launch each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import guestfs
import pytest

from h2k import registry
from h2k.changes import FileCopy, FileWrite, RegDeleteKey, RegValue
from h2k.driverpack import open_pack
from h2k.facts import WindowsFacts
from h2k.fix import ENGINE_CHANGES, FixReport, fix_image
from h2k.journal import host_journal_path
from h2k.overlay import convert, sha256_file
from h2k.plan import build_plan
from h2k.rollback import rollback_image
from h2k.ntfs_acl import (ADMINISTRATORS_SID, FILE_ALL_ACCESS, FILE_GENERIC_READ_EXECUTE, SYSTEM_SID,
                          USERS_SID)
from lab.testbed import virtio_win, windisk

from ntfs_oracle import audit, audit_file, partition_image

pytestmark = [pytest.mark.guestfs, pytest.mark.slow]

H2K = [sys.executable, "-m", "h2k"]
VALID = ["win2019-bios", "win2022-uefi", "win11-uefi", "win7-bios"]
BUS = {"win2019-bios": "virtio-blk", "win2022-uefi": "virtio-scsi", "win11-uefi": "virtio-blk", "win7-bios": "virtio-scsi"}
DRIVER = {"virtio-blk": "viostor", "virtio-scsi": "vioscsi"}


def grouped(names):
    return [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in names]


@pytest.fixture(scope="session")
def pack_dir() -> Path:
    return virtio_win.build_tree()


def _partition_number(device: str) -> int:
    return int("".join(c for c in device if c.isdigit()))


def extract(images: dict[str, Path], facts: WindowsFacts, paths: list[str], dest: Path) -> dict[str, dict]:
    """One read-only launch over several disks of the same layout: their hives, BCD, and file hashes."""
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    g = guestfs.GuestFS(python_return_dict=True)
    for img in images.values():
        g.add_drive_opts(str(img), readonly=1)
    g.launch()
    out: dict[str, dict] = {}
    try:
        devices = g.list_devices()
        for (label, _), disk in zip(images.items(), devices):
            d = dest / label
            d.mkdir(parents=True, exist_ok=True)
            root = f"{disk}{_partition_number(facts.root)}"
            mp_root, mp_boot = f"/{label}-root", f"/{label}-boot"
            g.mkmountpoint(mp_root)
            g.mount_ro(root, mp_root)
            info: dict = {"files": {}}
            for hive in ("SYSTEM", "SOFTWARE"):
                g.download(g.case_sensitive_path(f"{mp_root}/Windows/System32/config/{hive}"), str(d / hive))
            for p in paths:
                try:
                    real = g.case_sensitive_path(f"{mp_root}{p}")
                except RuntimeError:  # a parent directory is missing
                    real = None
                info["files"][p] = hashlib.sha256(g.read_file(real)).hexdigest() if real and g.is_file(real) else None
            info["guest_root"] = sorted(g.ls(mp_root))
            boot = f"{disk}{_partition_number(facts.bcd_device)}"
            if boot != root:
                g.mkmountpoint(mp_boot)
                g.mount_ro(boot, mp_boot)
                g.download(g.case_sensitive_path(f"{mp_boot}{facts.bcd_path}"), str(d / "BCD"))
                info["boot_files"] = sorted(g.find(mp_boot))
                # Every file of the boot volume by content (a handful: boot manager(s), BCD, backups); find()
                # names them from the mount point: "/EFI/...".
                info["boot_hashes"] = {p.lower(): g.checksum("sha256", f"{mp_boot}{p}")
                                       for p in info["boot_files"] if g.is_file(f"{mp_boot}{p}")}
            else:
                g.download(g.case_sensitive_path(f"{mp_root}{facts.bcd_path}"), str(d / "BCD"))
            info["config_files"] = sorted(g.ls(g.case_sensitive_path(f"{mp_root}/Windows/System32/config")))
            out[label] = info
    finally:
        g.close()
    return out


@dataclass
class Run:
    name: str
    source: Path
    source_sha_before: str
    fixed: Path
    report: FixReport
    second: FixReport
    rollback: object
    facts: WindowsFacts
    plan_changes: list
    hives: dict[str, Path]  # label -> dir with SYSTEM, SOFTWARE, BCD
    info: dict[str, dict]
    verify: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def run(request, tmp_path_factory, pack_dir) -> Run:
    name = request.param
    src = windisk.build(name)
    sha_before = sha256_file(src)
    tmp = tmp_path_factory.mktemp(name)
    pack = open_pack(pack_dir)
    bus = BUS[name]
    planner = lambda facts: build_plan(facts, pack, bus)  # noqa: E731

    fixed = tmp / "fixed.qcow2"
    report = fix_image(src, planner, output=fixed, ems=True)
    facts = WindowsFacts.from_dict(report.facts)
    plan = build_plan(facts, pack, bus)

    again = convert(fixed, tmp / "again.qcow2")
    second = fix_image(again, planner, in_place=True, ems=True)
    rolled = convert(again, tmp / "rolled.qcow2")
    # The copy travels with the journal beside it (so rollback opens it read-write at once; without
    # one it looks read-only first: tests/hostile/test_crash_rollback.py covers that launch).
    shutil.copyfile(report.journal, host_journal_path(rolled, report.run_id))
    rb = rollback_image(rolled)

    paths = sorted({c.dest for c in plan.changes if isinstance(c, (FileCopy, FileWrite))})
    images = {"source": src, "fixed": fixed, "again": again, "rolled": rolled}
    info = extract(images, facts, paths, tmp / "hives")
    verify = subprocess.run(H2K + ["verify", str(fixed), "--bus", bus], capture_output=True, text=True)
    return Run(name, src, sha_before, fixed, report, second, rb, facts, plan.changes,
               {k: tmp / "hives" / k for k in images}, info, verify)


def pytest_generate_tests(metafunc):
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", grouped(VALID), indirect=True, scope="module")


# ------------------------------------------------------------------ asserts


def test_facts_match_the_recipe(run: Run) -> None:
    r = windisk.VARIANTS[run.name]
    f = run.facts
    assert (f.product_name, f.edition, f.build, f.major, f.minor) == (
        r.product_name, r.edition_id, r.build, r.major, r.minor)
    assert f.arch == r.arch and f.firmware == r.firmware and f.firmware_source == "partition-table"
    assert f.current_control_set == r.current_control_set
    assert f.has_driver_database == r.driver_database
    assert f.is_server == (r.installation_type == "Server")
    assert f.drive_mappings.get("C") == f.root
    assert f.bcd_path == ("/EFI/Microsoft/Boot/BCD" if r.firmware == "uefi" else "/Boot/BCD")
    assert f.bcd_device != f.root
    assert "vmware" in f.hypervisor_tools
    assert any(s.name.lower() == r.storage_service and s.start == 0 for s in f.storage_drivers)
    assert any(r.ip_address in n.addresses and not n.dhcp for n in f.nics)
    assert f.blockers == []
    # The ESP's removable-media loader against bootmgfw.efi, by content (BIOS: not looked at).
    fallback = {"copy": "same", "stale": "differs", "none": "missing"}[r.uefi_fallback]
    assert f.uefi_fallback == (fallback if r.firmware == "uefi" else None)


def _live(run: Run, key: str) -> str:
    return registry.resolve_key(key, run.facts.current_control_set)


def test_every_planned_value_is_in_the_live_control_set(run: Run) -> None:
    hive = {"SYSTEM": run.hives["fixed"] / "SYSTEM", "SOFTWARE": run.hives["fixed"] / "SOFTWARE"}
    planned = [c for c in run.plan_changes + ENGINE_CHANGES if isinstance(c, RegValue)]
    assert planned
    for c in planned:
        got = registry.read_value(hive[c.hive], _live(run, c.key), c.name)
        assert got is not None, f"{c.hive}\\{_live(run, c.key)}\\{c.name} missing"
        assert registry.same_value(got[0], got[1], c.type, registry.encode(c.type, c.data)), c
    drv = DRIVER[BUS[run.name]]
    ccs = f"ControlSet{run.facts.current_control_set:03d}"
    assert registry.read_value(hive["SYSTEM"], f"{ccs}\\Services\\{drv}", "Start") == (4, b"\0\0\0\0")
    assert registry.read_value(hive["SYSTEM"], f"{ccs}\\Control\\CrashControl", "AutoReboot") == (4, b"\0\0\0\0")
    for other in ("ControlSet001", "ControlSet002"):
        if other != ccs:  # the stale set (win2022: ControlSet001) is left alone
            assert registry.read_value(hive["SYSTEM"], f"{other}\\Services\\{drv}", "Start") is None
    for c in run.plan_changes:
        if isinstance(c, RegDeleteKey):
            h = registry.hivex.Hivex(str(hive[c.hive]))
            assert registry.find_key(h, _live(run, c.key)) is None


def _planned_keys(run: Run, hive: str) -> tuple[set[tuple[str, str]], list[str]]:
    values = {(_live(run, c.key).lower(), c.name.lower()) for c in run.plan_changes + ENGINE_CHANGES
              if isinstance(c, RegValue) and c.hive == hive}
    deleted = [_live(run, c.key).lower() for c in run.plan_changes if isinstance(c, RegDeleteKey) and c.hive == hive]
    return values, deleted


def test_no_collateral_changes(run: Run) -> None:
    for hive in ("SYSTEM", "SOFTWARE"):
        before = registry.snapshot(run.hives["source"] / hive)
        after = registry.snapshot(run.hives["fixed"] / hive)
        values, deleted = _planned_keys(run, hive)
        planned_keys = {k for k, _ in values}
        for key in set(before) | set(after):
            if any(key == d or key.startswith(d + "\\") for d in deleted):
                assert key not in after
                continue
            if key not in before:  # a new key must lie on the path to a planned value
                assert any(p == key or p.startswith(key + "\\") for p in planned_keys), f"unplanned key {hive}\\{key}"
                continue
            assert key in after, f"key {hive}\\{key} vanished"
            for name in set(before[key]) | set(after[key]):
                if before[key].get(name) != after[key].get(name):
                    assert (key, name) in values, f"unplanned change {hive}\\{key}\\{name}"


def test_bcd_ems_and_nothing_else(run: Run) -> None:
    from lab.testbed.bcd import read_bcd

    before, after = read_bcd(run.hives["source"] / "BCD"), read_bcd(run.hives["fixed"] / "BCD")
    loader = after["default"]
    assert before["default"] == loader and after["default_path"] == before["default_path"]
    assert after["objects"]["{9dea862c-5cdd-4e70-acc1-f32b344d4795}"]["elements"]["16000020"] is True
    assert after["objects"][loader]["elements"]["260000b0"] is True
    ems = after["objects"]["{0ce4991b-e6b3-4b16-b23c-5e0d9250e5d9}"]["elements"]
    assert ems["15000022"] == 1 and ems["15000023"] == 115200
    diff = registry.snapshot(run.hives["source"] / "BCD"), registry.snapshot(run.hives["fixed"] / "BCD")
    changed = {k for k in set(diff[0]) | set(diff[1]) if diff[0].get(k) != diff[1].get(k)}
    assert all(k.endswith(("\\16000020", "\\260000b0", "\\15000022", "\\15000023")) for k in changed), changed
    assert run.report.bcd_problems == [] and run.report.bcd_repairs == []


def test_files_written_and_backups_kept(run: Run) -> None:
    fixed = run.info["fixed"]
    for c in run.plan_changes:
        if isinstance(c, (FileCopy, FileWrite)):
            content = Path(c.source).read_bytes() if isinstance(c, FileCopy) else c.content
            assert fixed["files"][c.dest] == hashlib.sha256(content).hexdigest(), c.dest
            assert run.info["source"]["files"][c.dest] is None  # nothing pre-existed: all new files
    assert any(n.startswith("SYSTEM.h2k-backup-") for n in fixed["config_files"])
    assert "hyper2kvm" in fixed["guest_root"]
    journal = json.loads(Path(run.report.journal).read_text())
    assert {h["name"] for h in journal["hives"]} == {"SYSTEM", "BCD"}
    assert all(h["sha256_before"] != h["sha256_after"] for h in journal["hives"])


def test_second_fix_is_nothing_to_do(run: Run) -> None:
    assert not run.report.nothing_to_do and run.report.registry_changes > 0
    assert run.second.nothing_to_do and run.second.registry_changes == 0 and run.second.files_written == []
    assert run.second.journal is None
    for f in ("SYSTEM", "SOFTWARE", "BCD"):
        assert sha256_file(run.hives["again"] / f) == sha256_file(run.hives["fixed"] / f), f


def test_rollback_is_byte_identical(run: Run) -> None:
    assert sorted(run.rollback.hives_restored) == ["BCD", "SYSTEM"] and run.rollback.hives_undone == []
    for f in ("SYSTEM", "SOFTWARE", "BCD"):
        assert sha256_file(run.hives["rolled"] / f) == sha256_file(run.hives["source"] / f), f
    rolled, source = run.info["rolled"], run.info["source"]
    assert rolled["files"] == source["files"]  # every written file gone
    assert rolled["guest_root"] == source["guest_root"]  # /hyper2kvm removed
    assert rolled["config_files"] == source["config_files"]  # hive backups removed
    assert rolled.get("boot_files") == source.get("boot_files")
    assert rolled.get("boot_hashes") == source.get("boot_hashes")  # a replaced UEFI fallback loader too


BOOTMGFW, FALLBACK = "/efi/microsoft/boot/bootmgfw.efi", "/efi/boot/bootx64.efi"


def test_uefi_fallback_loader_is_the_boot_manager(run: Run) -> None:
    """Fresh NVRAM boots \\EFI\\BOOT\\BOOTX64.EFI: after the fix it is bootmgfw.efi's bytes. A stale one
    (win11-uefi: an older build's boot manager) is replaced and kept under the run's backup folder
    on the ESP; a loader that already is a copy (win2022-uefi) is not touched."""
    r = windisk.VARIANTS[run.name]
    if r.firmware != "uefi":
        assert run.report.uefi_fallback is None and run.facts.uefi_fallback is None
        return
    source, fixed = run.info["source"]["boot_hashes"], run.info["fixed"]["boot_hashes"]
    assert fixed[FALLBACK] == fixed[BOOTMGFW] == source[BOOTMGFW]
    backup_dir = f"/hyper2kvm/backup/{run.report.run_id}".lower()  # the hashes are keyed by lower-case paths
    backups = {p: h for p, h in fixed.items() if p.startswith(backup_dir + "/")}
    if r.uefi_fallback == "stale":
        assert source[FALLBACK] != source[BOOTMGFW]
        assert backups == {backup_dir + FALLBACK: source[FALLBACK]}
        assert "was not Windows' boot manager (backed up)" in run.report.uefi_fallback
    else:
        assert r.uefi_fallback == "copy" and fixed[FALLBACK] == source[FALLBACK]
        assert backups == {} and run.report.uefi_fallback is None


def test_source_untouched(run: Run) -> None:
    assert sha256_file(run.source) == run.source_sha_before


def test_new_files_private_or_read_only_for_users(run: Run, tmp_path) -> None:
    """ntfs-3g's own ntfssecaudit (not h2k's decoder) reads the fixed disk's descriptors: staging,
    journal, backups only SYSTEM and Administrators; drivers in System32 also readable by Users."""
    r = windisk.VARIANTS[run.name]
    parts = {p.role: p for p in windisk.layout(r)}
    win = parts["windows"]
    volume = partition_image(run.fixed, win.start, win.end, tmp_path / "c.raw")
    private = {**audit(volume, "/Windows/Drivers/h2k-staging"), **audit(volume, "/hyper2kvm")}
    private[f"/Windows/System32/config/SYSTEM.h2k-backup-{run.report.run_id}"] = audit_file(
        volume, f"/Windows/System32/config/SYSTEM.h2k-backup-{run.report.run_id}")
    if r.firmware == "bios":  # the BCD's backup sits on the NTFS System Reserved partition
        sr = parts["system-reserved"]
        boot = partition_image(run.fixed, sr.start, sr.end, tmp_path / "sr.raw")
        private[f"sr:/Boot/BCD.h2k-backup-{run.report.run_id}"] = audit_file(
            boot, f"/Boot/BCD.h2k-backup-{run.report.run_id}")
    assert len(private) > 25
    for path, a in private.items():
        assert a.owner == ADMINISTRATORS_SID and a.grants() == {SYSTEM_SID: FILE_ALL_ACCESS,
                                                                ADMINISTRATORS_SID: FILE_ALL_ACCESS}, (path, a.aces)
    drv = DRIVER[BUS[run.name]]
    a = audit_file(volume, f"/Windows/System32/drivers/{drv}.sys")
    assert a.grants() == {SYSTEM_SID: FILE_ALL_ACCESS, ADMINISTRATORS_SID: FILE_ALL_ACCESS,
                          USERS_SID: FILE_GENERIC_READ_EXECUTE}, a.aces


def test_verify_passes_on_the_fixed_disk(run: Run) -> None:
    assert run.verify.returncode == 0, run.verify.stdout + run.verify.stderr
    lines = run.verify.stdout.splitlines()
    assert any(line.startswith("PASS  service") for line in lines)
    assert any(line.startswith("PASS  bcd") for line in lines)
    assert not any(line.startswith("FAIL") for line in lines)


# ------------------------------------------------------------------ bad input


# The unfixed source failing verify is asserted on the sysprep-uefi disk
# (tests/integration/test_windows_sysprep.py::test_verify_fails_on_the_unfixed_source).


BAD = {
    "bad-hibernated": (4, "hibernated"),
    "bad-truncated-hive": (3, "corrupt hive"),
    "bad-linux": (None, ""),  # handed to h2k.linux when it is importable: its own one-line cause
    "bad-empty": (3, "no partitions"),
}


@pytest.mark.parametrize("name", grouped(sorted(BAD)))
def test_bad_variant_refused_with_nothing_left(name, tmp_path, pack_dir) -> None:
    src = windisk.build(name)
    before = sha256_file(src)
    out = tmp_path / "out.qcow2"
    # The Linux disk gets no --drivers: a Linux guest needs no driver pack.
    drivers = [] if name == "bad-linux" else ["--drivers", str(pack_dir)]
    proc = subprocess.run(H2K + ["fix", str(src), *drivers, "--bus", "virtio-blk", "-o", str(out)],
                          capture_output=True, text=True)
    code, words = BAD[name]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("h2k: error: ")]
    assert proc.returncode != 0 and (code is None or proc.returncode == code), proc.stderr
    assert len(errors) == 1 and words in errors[0].lower(), proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, no temporary overlay
    assert sha256_file(src) == before


@pytest.mark.xdist_group("win2019-bios")
def test_windows_without_a_driver_pack_is_refused(tmp_path) -> None:
    src = windisk.build("win2019-bios")
    before = sha256_file(src)
    out = tmp_path / "out.qcow2"
    proc = subprocess.run(H2K + ["fix", str(src), "--bus", "virtio-blk", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stderr.count("h2k: error: ") == 1, proc.stderr
    assert "Windows guest" in proc.stderr and "needs --drivers" in proc.stderr
    assert list(tmp_path.iterdir()) == [] and sha256_file(src) == before


def test_unreadable_image_is_bad_input(tmp_path, pack_dir) -> None:
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + b"\0" * 100)  # a qcow2 magic with a broken header
    proc = subprocess.run(H2K + ["fix", str(junk), "--drivers", str(pack_dir), "--bus", "virtio-blk"],
                          capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stderr.count("h2k: error: ") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.qcow2"]
