"""A generalized (sysprepped) UEFI template without a fallback loader, fixed for real: libguestfs + hivex.

The test-bed disk ``sysprep-uefi`` is what ``sysprep /generalize /oobe`` leaves (SYSTEM\\Setup
CmdLine=oobe\\windeploy.exe, SetupType=2, both in-progress flags 1, ImageState
IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE), with a SetupComplete.cmd of its own and no
\\EFI\\Boot\\bootx64.efi on the ESP. Launches, shared by every assert (one xdist group):
fix (-o copy), a second fix in place on a copy (nothing to do), rollback of a copy, one
read-only launch over the four disks, ``h2k verify`` of the fixed disk and of the source.
Security descriptors are read by ntfs-3g's own ``ntfssecaudit`` from the fixed disk's
partition on the host (no launch).
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import guestfs
import pytest

from h2k import accel, firstboot, ntfs_acl, registry
from h2k.driverpack import open_pack
from h2k.facts import WindowsFacts
from h2k.fix import FixReport, fix_image
from h2k.overlay import convert, sha256_file
from h2k.plan import build_plan
from h2k.rollback import rollback_image
from lab.testbed import virtio_win, windisk

from ntfs_oracle import audit, audit_file, partition_image

pytestmark = [pytest.mark.guestfs, pytest.mark.slow, pytest.mark.xdist_group("sysprep-uefi")]

H2K = [sys.executable, "-m", "h2k"]
NAME = "sysprep-uefi"
BUS = "virtio-scsi"
RECIPE = windisk.VARIANTS[NAME]
SETUP_COMPLETE = "/Windows/Setup/Scripts/SetupComplete.cmd"
STAGING = "/Windows/Drivers/h2k-staging"
FALLBACK = "/EFI/BOOT/BOOTX64.EFI"
BOOTMGFW = "/EFI/Microsoft/Boot/bootmgfw.efi"


@dataclass
class Run:
    source: Path
    source_sha_before: str
    fixed: Path
    report: FixReport
    second: FixReport
    rollback: object
    facts: WindowsFacts
    plan_changes: list
    info: dict[str, dict]  # label -> what one read-only launch saw
    verify_fixed: subprocess.CompletedProcess
    verify_source: subprocess.CompletedProcess
    tmp: Path


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _real(g, path: str) -> str | None:
    """The real spelling of a case-insensitive path, None if it (or a parent) does not exist."""
    try:
        real = g.case_sensitive_path(path)
    except RuntimeError:  # a parent is missing
        return None
    return real if g.exists(real) else None


def _read(g, path: str) -> bytes | None:
    real = _real(g, path)
    return g.read_file(real) if real and g.is_file(real) else None


def _extract(images: dict[str, Path], dest: Path) -> dict[str, dict]:
    """One read-only launch: hives, SetupComplete.cmd (bytes, descriptor), the ESP's loaders and files."""
    parts = {p.role: p.number for p in windisk.layout(RECIPE)}
    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    for img in images.values():
        g.add_drive_opts(str(img), readonly=1, format="qcow2")
    g.launch()
    out: dict[str, dict] = {}
    try:
        for (label, _), disk in zip(images.items(), g.list_devices()):
            d = dest / label
            d.mkdir(parents=True, exist_ok=True)
            win, esp = f"/{label}-win", f"/{label}-esp"
            g.mkmountpoint(win)
            g.mkmountpoint(esp)
            g.mount_ro(f"{disk}{parts['windows']}", win)
            g.mount_ro(f"{disk}{parts['esp']}", esp)
            for hive in ("SYSTEM", "SOFTWARE"):
                g.download(g.case_sensitive_path(f"{win}/Windows/System32/config/{hive}"), str(d / hive))
            g.download(g.case_sensitive_path(f"{esp}/EFI/Microsoft/Boot/BCD"), str(d / "BCD"))
            sc = _real(g, f"{win}{SETUP_COMPLETE}")
            staging = _real(g, f"{win}{STAGING}")
            out[label] = {
                "setup_complete": _read(g, f"{win}{SETUP_COMPLETE}"),
                "setup_complete_sd": bytes(g.getxattr(sc, ntfs_acl.XATTR)) if sc else None,
                "fallback": _read(g, f"{esp}{FALLBACK}"),
                "bootmgfw": _read(g, f"{esp}{BOOTMGFW}"),
                "esp_files": sorted(p.lower() for p in g.find(esp)),
                "win_root": sorted(g.ls(win)),
                "staging": sorted(g.find(staging)) if staging else [],
                "hives": d,
            }
    finally:
        g.close()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    src = windisk.build(NAME)
    sha_before = sha256_file(src)
    tmp = tmp_path_factory.mktemp(NAME)
    pack = open_pack(virtio_win.build_tree())
    planner = lambda facts: build_plan(facts, pack, BUS)  # noqa: E731

    fixed = tmp / "fixed.qcow2"
    report = fix_image(src, planner, output=fixed)
    facts = WindowsFacts.from_dict(report.facts)
    again = convert(fixed, tmp / "again.qcow2")
    second = fix_image(again, planner, in_place=True)
    rolled = convert(again, tmp / "rolled.qcow2")
    rb = rollback_image(rolled)
    info = _extract({"source": src, "fixed": fixed, "again": again, "rolled": rolled}, tmp / "x")
    verify_fixed = subprocess.run(H2K + ["verify", str(fixed), "--bus", BUS], capture_output=True, text=True)
    verify_source = subprocess.run(H2K + ["verify", str(src), "--bus", BUS], capture_output=True, text=True)
    return Run(src, sha_before, fixed, report, second, rb, facts, build_plan(facts, pack, BUS).changes, info,
               verify_fixed, verify_source, tmp)


def _setup_key(hive: Path) -> dict:
    return registry.snapshot(hive)["setup"]


# ------------------------------------------------------------------ Windows Setup's state


def test_inspection_reports_the_generalized_state(run: Run) -> None:
    s = run.facts.setup
    assert s.kind == "generalized" and not s.idle
    want = RECIPE.setup_values()  # what sysprep /generalize /oobe leaves (the recipe, not the engine)
    assert (s.cmdline, s.setup_type, s.system_setup_in_progress, s.oobe_in_progress) == (
        want["CmdLine"], want["SetupType"], want["SystemSetupInProgress"], want["OOBEInProgress"])
    assert s.image_state == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
    template = windisk.TEMPLATE_SETUP_COMPLETE.replace("\n", "\r\n").encode()
    assert s.setup_complete_size == len(template) and base64.b64decode(s.setup_complete_b64) == template
    assert run.facts.uefi_fallback == "missing" and run.facts.uefi_fallback_path == FALLBACK


def test_setup_values_read_back_unchanged(run: Run) -> None:
    """hivex on the fixed and the rolled-back disk: SYSTEM\\Setup and ImageState exactly as sysprep left them."""
    source = _setup_key(run.info["source"]["hives"] / "SYSTEM")
    assert len(source) == 4  # CmdLine, SetupType, SystemSetupInProgress, OOBEInProgress
    for label in ("fixed", "again", "rolled"):
        assert _setup_key(run.info[label]["hives"] / "SYSTEM") == source, label
        state = registry.read_value(run.info[label]["hives"] / "SOFTWARE",
                                    "Microsoft\\Windows\\CurrentVersion\\Setup\\State", "ImageState")
        assert state is not None and registry.decode(*state) == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE", label
    for name, value in RECIPE.setup_values().items():
        got = registry.read_value(run.info["fixed"]["hives"] / "SYSTEM", "Setup", name)
        assert got is not None and registry.decode(*got) == value, name
    assert not [c for c in run.plan_changes if getattr(c, "key", "").lower().startswith("setup")]


def test_storage_binding_still_written_and_verify_passes(run: Run) -> None:
    ccs = f"ControlSet{RECIPE.current_control_set:03d}"
    got = registry.read_value(run.info["fixed"]["hives"] / "SYSTEM", f"{ccs}\\Services\\vioscsi", "Start")
    assert got == (4, b"\0\0\0\0")
    assert run.verify_fixed.returncode == 0, run.verify_fixed.stdout + run.verify_fixed.stderr
    lines = run.verify_fixed.stdout.splitlines()
    for rule in ("service", "binding-drvdb", "bcd", "uefi-fallback"):
        assert any(line.startswith(f"PASS  {rule}") for line in lines), rule


def test_setupcomplete_runs_the_bootstrap_then_the_template_script(run: Run) -> None:
    template = windisk.TEMPLATE_SETUP_COMPLETE.replace("\n", "\r\n").encode()
    fixed = run.info["fixed"]["setup_complete"]
    assert run.info["source"]["setup_complete"] == template
    assert fixed.endswith(template)  # the template's own script, byte for byte, after our block
    block = fixed[: len(fixed) - len(template)]
    assert block.startswith(firstboot.BLOCK_BEGIN) and block.endswith(firstboot.BLOCK_END)
    block.decode("ascii")
    assert b"\n" not in block.replace(b"\r\n", b"")
    assert b'C:\\Windows\\Drivers\\h2k-staging\\h2k-bootstrap.cmd" setupcomplete' in block
    # The replaced script keeps its descriptor (the one Windows gives files under %WINDIR%).
    assert run.info["source"]["setup_complete_sd"] == windisk.WINDOWS_FILE_SD
    assert run.info["fixed"]["setup_complete_sd"] == windisk.WINDOWS_FILE_SD
    # A Server edition runs SetupComplete.cmd whatever its product key: no RunOnce fallback.
    assert registry.read_value(run.info["fixed"]["hives"] / "SOFTWARE", firstboot.RUNONCE_KEY,
                               firstboot.RUNONCE_VALUE) is None
    staged = {p.lower() for p in run.info["fixed"]["staging"]}
    for name in ("/h2k-bootstrap.cmd", "/h2k-firstboot.cmd", "/h2k-watchdog.ps1", "/h2k-firstboot.xml",
                 "/steps.txt", "/steps/drivers.cmd", "/steps/guest-agent.cmd"):
        assert name in staged, name


def test_uefi_fallback_loader_installed(run: Run) -> None:
    src, fixed = run.info["source"], run.info["fixed"]
    assert src["fallback"] is None and src["bootmgfw"][:2] == b"MZ"
    assert _sha(fixed["fallback"]) == _sha(fixed["bootmgfw"]) == _sha(src["bootmgfw"])
    assert set(fixed["esp_files"]) - set(src["esp_files"]) == {"/efi/boot", "/efi/boot/bootx64.efi"}
    assert run.report.uefi_fallback and "was missing" in run.report.uefi_fallback


def test_second_fix_changes_nothing(run: Run) -> None:
    assert not run.report.nothing_to_do
    assert run.second.nothing_to_do and run.second.files_written == [] and run.second.uefi_fallback is None
    for label in ("SYSTEM", "SOFTWARE", "BCD"):
        assert sha256_file(run.info["again"]["hives"] / label) == sha256_file(run.info["fixed"]["hives"] / label)
    for key in ("setup_complete", "setup_complete_sd", "fallback", "esp_files", "staging"):
        assert run.info["again"][key] == run.info["fixed"][key], key


def test_rollback_is_byte_identical(run: Run) -> None:
    # Only SYSTEM changed (no EMS asked, a Server edition gets no RunOnce in SOFTWARE).
    assert run.report.hives_changed == ["SYSTEM"]
    assert run.rollback.hives_restored == ["SYSTEM"] and run.rollback.hives_undone == []
    assert run.rollback.files_restored == [SETUP_COMPLETE]
    src, rolled = run.info["source"], run.info["rolled"]
    for label in ("SYSTEM", "SOFTWARE", "BCD"):
        assert sha256_file(rolled["hives"] / label) == sha256_file(src["hives"] / label), label
    for key in ("setup_complete", "setup_complete_sd", "fallback", "esp_files", "win_root", "staging"):
        assert rolled[key] == src[key], key


def test_source_untouched(run: Run) -> None:
    assert sha256_file(run.source) == run.source_sha_before


def test_verify_fails_on_the_unfixed_source(run: Run) -> None:
    proc = run.verify_source
    assert proc.returncode == 1
    for rule in ("service", "binding-drvdb", "uefi-fallback"):
        assert f"FAIL  {rule}" in proc.stdout, rule
    assert "\\EFI\\BOOT\\BOOTX64.EFI is missing" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("h2k: error: ")


# ------------------------------------------------------------------ security descriptors (ntfssecaudit)

FULL = ntfs_acl.FILE_ALL_ACCESS
SY, BA, BU = ntfs_acl.SYSTEM_SID, ntfs_acl.ADMINISTRATORS_SID, ntfs_acl.USERS_SID


@pytest.fixture(scope="module")
def volume(run: Run) -> Path:
    win = next(p for p in windisk.layout(RECIPE) if p.role == "windows")
    return partition_image(run.fixed, win.start, win.end, run.tmp / "fixed-c.raw")


def test_staging_scripts_and_backups_private_to_system_and_administrators(run: Run, volume: Path) -> None:
    seen = {**audit(volume, STAGING), **audit(volume, "/hyper2kvm")}
    hive_backup = f"/Windows/System32/config/SYSTEM.h2k-backup-{run.report.run_id}"
    seen[hive_backup] = audit_file(volume, hive_backup)
    assert len(seen) > 30 and f"{STAGING}/steps/drivers.cmd" in seen and "/hyper2kvm/journal" in seen
    for path, a in seen.items():
        assert a.owner == BA, path
        assert a.grants() == {SY: FULL, BA: FULL}, (path, a.aces)  # nobody else, not even to read
        assert a.control & ntfs_acl.SE_DACL_PROTECTED, path
        flags = {f for _, f, _, _ in a.aces}
        assert flags == ({ntfs_acl.OBJECT_INHERIT_ACE | ntfs_acl.CONTAINER_INHERIT_ACE} if a.directory else {0}), path


def test_drivers_in_system_folders_readable_by_users_writable_by_admins_only(volume: Path) -> None:
    for path in ("/Windows/System32/drivers/vioscsi.sys", "/Windows/INF/vioscsi.inf"):
        a = audit_file(volume, path)
        assert a.grants() == {SY: FULL, BA: FULL, BU: ntfs_acl.FILE_GENERIC_READ_EXECUTE}, (path, a.aces)
