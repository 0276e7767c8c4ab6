"""A crash at any point of ``h2k fix --in-place`` loses nothing: ``h2k rollback`` gives the original back.

Real parts: the test bed's win2019-bios disk (copied), the real ``h2k`` command,
SIGKILL to its whole process group (h2k and everything in its group; the
libguestfs appliance runs in its own group and libguestfs' recovery process
kills it when h2k dies), then the real ``h2k rollback``.

Kill points are deterministic, not timed: the test watches the journal that an
in-place fix mirrors next to the image (written after the guest's copy is
synced, so whatever it shows is already on the guest's disk) and kills h2k as
soon as it shows the step, i.e. while the step's change is being made:

* A: the staged files are journalled (intent): killed while they are written;
* B: the SYSTEM hive is journalled (intent): killed during its backup/upload;
  its rollback is killed in turn once the files are undone, then resumed;
* C: the BCD is journalled (intent), SYSTEM already done: then "Windows" writes
  to SYSTEM (a real value changed with hivex in a test launch), rollback must
  refuse naming that value and change no byte of the image; ``--force`` restores.

The oracle is the guest-visible content read by libguestfs (independent of
h2k's code) in one read-only launch: for every file system, every path and the
SHA-256 of every file, plus the partition table area, compared with the
untouched test-bed disk. Not ``qemu-img compare`` of the blocks: NTFS metadata
($MFT records of files created and deleted, $LogFile, directory indexes)
legitimately differs after any read-write mount, even after a fix and rollback
that were never interrupted, while no file a guest can see differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import guestfs
import hivex
import pytest

from h2k.journal import DONE, INTENT, ROLLING_BACK, UNDONE, Journal, host_journals
from h2k.overlay import sha256_file
from lab.testbed import virtio_win, windisk

pytestmark = [pytest.mark.guestfs, pytest.mark.slow, pytest.mark.xdist_group("crash-win2019")]

H2K = [sys.executable, "-m", "h2k"]
VARIANT = "win2019-bios"
STEP_TIMEOUT = 900  # a launch under TCG on a loaded 2-core machine


@dataclass
class Killed:
    image: Path
    journal: Journal  # the host mirror as it was when h2k was killed
    returncode: int
    appliance: list[int]  # the processes other than h2k that had the image open when h2k was killed
    appliance_gone_after: float  # seconds until none of them was left


@dataclass
class Crash:
    pristine: Path
    killed: dict[str, Killed] = field(default_factory=dict)
    rollbacks: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    refused_sha: tuple[str, str] = ("", "")  # image sha before and after the refused rollback
    again_sha: tuple[str, str] = ("", "")  # after a full rollback, "nothing to roll back" changed nothing
    manifests: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # per step, reported with -s (each is one launch or two)


def _mirror(image: Path) -> Journal | None:
    paths = host_journals(image)
    if not paths:
        return None
    try:
        return Journal.load(paths[-1])  # written to a temporary file and renamed: never half
    except (OSError, ValueError):
        return None


def _users_of(image: Path) -> list[int]:
    """Processes whose command line names ``image`` (the appliance's QEMU has it in -drive)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if str(image).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def run_and_kill(args: list[str], image: Path, when) -> Killed:
    """Start h2k in its own session; SIGKILL its process group once the journal beside ``image`` shows ``when``."""
    proc = subprocess.Popen(H2K + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + STEP_TIMEOUT
    try:
        while True:
            journal = _mirror(image)
            if journal is not None and when(journal):
                appliance = [p for p in _users_of(image) if p != proc.pid]
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"h2k {args[0]} ended (exit {proc.returncode}) before the kill point: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"h2k {args[0]}: kill point not reached in {STEP_TIMEOUT}s")
            time.sleep(0.02)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    t0 = time.monotonic()
    while _users_of(image):  # libguestfs' recovery process kills the appliance within seconds
        if time.monotonic() - t0 > 60:
            break  # reported by test_no_appliance_outlives_a_killed_h2k (and rollback would fail on the lock)
        time.sleep(0.2)
    return Killed(image, journal, rc, appliance, time.monotonic() - t0)


def h2k(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(H2K + list(args), capture_output=True, text=True, timeout=STEP_TIMEOUT)


def windows_writes_system(image: Path, tmp: Path) -> tuple[int, int]:
    """Change SYSTEM\\Select\\LastKnownGood as Windows does after a good boot (a real hivex edit)."""
    g = guestfs.GuestFS(python_return_dict=True)
    g.add_drive_opts(str(image), format="qcow2", readonly=0)
    g.launch()
    try:
        g.mount("/dev/sda2", "/")
        path = g.case_sensitive_path("/Windows/System32/config/SYSTEM")
        local = tmp / "SYSTEM"
        g.download(path, str(local))
        h = hivex.Hivex(str(local), write=True)
        select = h.node_get_child(h.root(), "Select")
        old = int.from_bytes(h.value_value(h.node_get_value(select, "LastKnownGood"))[1], "little")
        new = old + 7
        h.node_set_value(select, {"key": "LastKnownGood", "t": 4, "value": new.to_bytes(4, "little")})
        h.commit(None)
        g.upload(str(local), path)
        g.umount_all()
        g.shutdown()
    finally:
        g.close()
    return old, new


def manifests(images: dict[str, Path], tmp: Path) -> dict[str, dict]:
    """Per image: the partition table area's hash and, per file system, every path and every file's SHA-256."""
    g = guestfs.GuestFS(python_return_dict=True)
    for img in images.values():
        g.add_drive_opts(str(img), format="qcow2", readonly=1)
    g.launch()
    out: dict[str, dict] = {}
    try:
        filesystems = g.list_filesystems()
        for label, disk in zip(images, g.list_devices()):
            m: dict = {"table": hashlib.sha256(g.pread_device(disk, 1 << 20, 0)).hexdigest()}
            for dev, fstype in sorted(filesystems.items()):
                if not dev.startswith(disk) or fstype in ("unknown", "swap"):
                    continue
                g.mount_ro(dev, "/")
                g.checksums_out("sha256", "/", str(tmp / "sums"))
                m[dev[len(disk):]] = {"files": sorted((tmp / "sums").read_text().splitlines()),
                                      "paths": sorted(g.find("/"))}
                g.umount_all()
            out[label] = m
    finally:
        g.close()
    return out


@pytest.fixture(scope="module")
def crash(tmp_path_factory) -> Crash:
    tmp = tmp_path_factory.mktemp("crash")
    pristine = windisk.build(VARIANT)
    pack = virtio_win.build_tree()
    result = Crash(pristine)
    images = {}
    for point in "ABC":
        images[point] = tmp / f"{point}.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(pristine), str(images[point])], check=True)

    def fix(image: Path) -> list[str]:
        return ["fix", str(image), "--in-place", "--ems", "--drivers", str(pack), "--bus", "virtio-blk"]

    k = result.killed
    t = time.monotonic()

    def step(name: str) -> None:
        nonlocal t
        result.seconds[name] = round(time.monotonic() - t, 1)
        t = time.monotonic()

    k["A"] = run_and_kill(fix(images["A"]), images["A"], lambda j: any(f.state == INTENT for f in j.files))
    step("A: fix killed")
    k["B"] = run_and_kill(fix(images["B"]), images["B"], lambda j: any(h.name == "SYSTEM" for h in j.hives))
    step("B: fix killed")
    k["C"] = run_and_kill(fix(images["C"]), images["C"], lambda j: any(h.name == "BCD" for h in j.hives))
    step("C: fix killed")

    # A: a disk copied without the journal beside it: rollback finds the guest's own (two launches).
    for j in host_journals(images["A"]):
        j.unlink()
    result.rollbacks["A"] = h2k("rollback", str(images["A"]))
    step("A: rollback (read-only look, then read-write)")

    # B: the rollback itself is killed once the files are undone, then resumed.
    k["B-rollback"] = run_and_kill(["rollback", str(images["B"])], images["B"],
                                   lambda j: j.state == ROLLING_BACK and any(f.state == UNDONE for f in j.files))
    step("B: rollback killed")
    result.rollbacks["B"] = h2k("rollback", str(images["B"]))
    step("B: rollback resumed")
    before = sha256_file(images["B"])
    result.rollbacks["B-again"] = h2k("rollback", str(images["B"]))
    result.again_sha = (before, sha256_file(images["B"]))
    step("B: nothing left (read-only)")

    # C: Windows wrote to SYSTEM after the (interrupted) fix had finished with it.
    windows_writes_system(images["C"], tmp)
    step("C: Windows writes SYSTEM")
    before = sha256_file(images["C"])
    result.rollbacks["C-refused"] = h2k("rollback", str(images["C"]))
    result.refused_sha = (before, sha256_file(images["C"]))
    step("C: rollback refused")
    result.rollbacks["C"] = h2k("rollback", "--force", str(images["C"]))
    step("C: rollback --force")

    result.manifests = manifests({"pristine": pristine, **images}, tmp)
    step("manifests of four disks")
    print("crash test steps (s):", json.dumps(result.seconds, indent=1))
    return result


def _one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("h2k: error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_fix_killed_at_each_step_was_killed_mid_run(crash: Crash) -> None:
    for point in "ABC":
        killed = crash.killed[point]
        assert killed.returncode == -signal.SIGKILL
        assert killed.journal.state == "running"  # the run never completed
    assert crash.killed["C"].journal.hives[0].name == "SYSTEM" and crash.killed["C"].journal.hives[0].state == DONE


def test_no_appliance_outlives_a_killed_h2k(crash: Crash) -> None:
    for name, killed in crash.killed.items():
        assert killed.appliance, f"{name}: no appliance had the image open when h2k was killed"
        assert killed.appliance_gone_after < 60, f"{name}: the appliance outlived h2k"


def test_rollback_after_a_kill_gives_back_the_original_content(crash: Crash) -> None:
    for point in ("A", "B", "C"):
        proc = crash.rollbacks[point]
        assert proc.returncode == 0, proc.stderr
        assert "interrupted fix run(s)" in proc.stdout or "finished an interrupted rollback" in proc.stdout, proc.stdout
    want = crash.manifests["pristine"]
    assert len(want) >= 2  # the partition table and at least one file system
    for point in "ABC":
        assert crash.manifests[point] == want, point
    assert not any(host_journals(crash.killed[p].image) for p in "ABC")


def test_an_interrupted_rollback_resumes(crash: Crash) -> None:
    killed = crash.killed["B-rollback"]
    assert killed.returncode == -signal.SIGKILL and killed.journal.state == ROLLING_BACK
    assert "finished an interrupted rollback" in crash.rollbacks["B"].stdout


def test_nothing_left_to_roll_back_changes_no_byte(crash: Crash) -> None:
    proc = crash.rollbacks["B-again"]
    assert proc.returncode == 3 and "nothing to roll back" in _one_error(proc)
    assert crash.again_sha[0] == crash.again_sha[1]


def test_a_change_since_the_fix_is_refused_by_name_then_forced(crash: Crash) -> None:
    proc = crash.rollbacks["C-refused"]
    assert proc.returncode == 4, proc.stderr
    line = _one_error(proc)
    assert "SYSTEM hive" in line and "select\\lastknowngood (changed)" in line and "--force" in line
    assert crash.refused_sha[0] == crash.refused_sha[1]  # the refusal wrote nothing
    forced = crash.rollbacks["C"]
    assert forced.returncode == 0 and "--force" in forced.stdout, forced.stderr
    # and the forced rollback's result is the original (checked with the others above)
    assert json.dumps(crash.manifests["C"], sort_keys=True) == json.dumps(crash.manifests["pristine"], sort_keys=True)
