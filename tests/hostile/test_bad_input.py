"""Every bad input is ONE line ``h2k: error: <cause>`` with its documented exit code, never a traceback.

One table walks every subcommand ``h2k --help`` lists (and every action of
``linux``, ``matrix``, ``testbed``) with bad inputs: a missing file, a
directory, an empty file, a truncated image, a broken format, an unreadable
file, bad numbers, bad environment, usage errors. Each case runs the real
``h2k`` command in its own process.

None of them may get as far as an appliance launch or a boot: QEMU on the PATH
and libguestfs' hypervisor (``LIBGUESTFS_HV``) are replaced by a script that
leaves a mark and fails, and the test asserts no mark was left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from h2k.cli import COMMAND_MODULES

ROOT = Path(__file__).resolve().parents[2]
INPUT_ERROR = 3


@dataclass
class Case:
    id: str
    argv: list[str]
    code: int = INPUT_ERROR
    says: str = ""  # a fragment the error line must contain (lower case compare)
    env: dict[str, str] = field(default_factory=dict)


def _files(tmp: Path) -> dict[str, Path]:
    """The bad inputs (and a few good ones the bad options go with)."""
    f = {}
    f["missing"] = tmp / "missing.qcow2"
    f["dir"] = tmp / "folder.qcow2"
    f["dir"].mkdir()
    f["empty"] = tmp / "empty.qcow2"
    f["empty"].write_bytes(b"")
    good = tmp / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(good), "64M"], check=True)
    f["good"] = good
    f["truncated"] = tmp / "truncated.qcow2"
    f["truncated"].write_bytes(good.read_bytes()[:512])  # a qcow2 header whose tables are gone
    f["broken-vmdk"] = tmp / "broken.vmdk"  # a descriptor naming an extent that is not there
    f["broken-vmdk"].write_text(textwrap.dedent("""\
        # Disk DescriptorFile
        version=1
        CID=fffffffe
        parentCID=ffffffff
        createType="monolithicFlat"
        RW 131072 FLAT "broken-flat.vmdk" 0
        ddb.virtualHWVersion = "4"
        """))
    f["unreadable"] = tmp / "unreadable.qcow2"
    if os.geteuid() == 0:  # root reads any mode: a file the kernel refuses to anyone
        f["unreadable"].symlink_to("/proc/sys/vm/drop_caches")
    else:
        f["unreadable"].write_bytes(b"QFI\xfb")
        f["unreadable"].chmod(0)
    f["garbage"] = tmp / "garbage.json"
    f["garbage"].write_text("{this is not json")
    f["not-a-matrix"] = tmp / "m.yaml"
    f["not-a-matrix"].write_text("- just\n- a list\n")
    f["matrix"] = tmp / "good.yaml"
    f["matrix"].write_text(textwrap.dedent(f"""\
        name: bad-input
        images: [{{name: a, kind: linux, path: "{good}"}}]
        firmware: [bios]
        bus: [virtio-blk]
        """))
    f["ovf-bad-cpus"] = tmp / "vm.ovf"
    f["ovf-bad-cpus"].write_text(textwrap.dedent("""\
        <?xml version="1.0"?>
        <Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
                  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
          <References><File ovf:id="f1" ovf:href="blank.qcow2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"/></References>
          <DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="67108864"
                             xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"/></DiskSection>
          <VirtualSystem ovf:id="vm" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
            <VirtualHardwareSection>
              <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>many</rasd:VirtualQuantity></Item>
              <Item><rasd:ResourceType>17</rasd:ResourceType><rasd:HostResource>ovf:/disk/d1</rasd:HostResource></Item>
            </VirtualHardwareSection>
          </VirtualSystem>
        </Envelope>
        """))
    f["out"] = tmp / "out" / "result.qcow2"
    f["out"].parent.mkdir()
    f["no-folder-out"] = tmp / "no" / "such" / "folder" / "result.qcow2"
    f["pack"] = tmp / "pack"  # a driver pack folder (its content is never reached)
    f["pack"].mkdir()
    return f


# Commands that take a disk image (or VM) as their main input, as argv with X for it.
IMAGE_COMMANDS = {
    "inspect": ["inspect", "X"],
    "fix": ["fix", "X", "--drivers", "{pack}", "--bus", "virtio-blk"],
    "verify": ["verify", "X", "--bus", "virtio-blk"],
    "rollback": ["rollback", "X"],
    "plan": ["plan", "X", "--drivers", "{pack}", "--bus", "virtio-blk"],
    "domain": ["domain", "X", "--os", "windows", "--no-validate"],
    "boot": ["boot", "X", "--timeout", "30"],
    "convert": ["convert", "X", "-o", "{out}"],
    "linux inspect": ["linux", "inspect", "X"],
    "linux fix": ["linux", "fix", "X"],
    "linux verify": ["linux", "verify", "X"],
    "linux rollback": ["linux", "rollback", "X"],
}
BAD_IMAGES = ["missing", "dir", "empty", "truncated", "broken-vmdk", "unreadable"]


def cases() -> list[Case]:
    out = [Case(f"{cmd}:{bad}", argv, says="X") for cmd, argv in IMAGE_COMMANDS.items() for bad in BAD_IMAGES]
    out += [
        # usage errors (argparse): bad input, not an engine error
        Case("usage:no-command", [], says="required"),
        Case("usage:unknown-command", ["frobnicate"], says="invalid choice"),
        Case("usage:fix-without-bus", ["fix", "{good}"], says="--bus"),
        Case("usage:option-without-value", ["inspect", "{good}", "--metadata"], says="--metadata"),
        Case("usage:bad-choice", ["verify", "{good}", "--bus", "virtio-blk", "--json", "--nope"], says="unrecognized"),
        Case("usage:linux-no-action", ["linux"], says="required"),
        Case("usage:matrix-no-action", ["matrix"], says="required"),
        Case("usage:testbed-no-action", ["testbed"], says="required"),
        Case("usage:testbed-list-extra", ["testbed", "list", "extra"], says="unrecognized"),
        Case("usage:demo-extra", ["demo", "extra"], says="unrecognized"),
        # bad numbers
        Case("numbers:boot-memory", ["boot", "{good}", "--memory", "lots"], says="--memory"),
        Case("numbers:boot-cpus-zero", ["boot", "{good}", "--cpus", "0"], says="cpu"),
        Case("numbers:boot-timeout-negative", ["boot", "{good}", "--timeout", "-5"], says="timeout"),
        Case("numbers:domain-memory-negative", ["domain", "{good}", "--os", "linux", "--memory", "-1",
                                                "--no-validate"], says="memory"),
        Case("numbers:domain-cpus-text", ["domain", "{good}", "--os", "linux", "--cpus", "two"], says="--cpus"),
        Case("numbers:matrix-jobs", ["matrix", "run", "{matrix}", "-j", "x"], says="-j"),
        Case("numbers:matrix-jobs-zero", ["matrix", "run", "{matrix}", "-j", "0"], says="jobs"),
        Case("numbers:matrix-shard", ["matrix", "run", "{matrix}", "--shard", "3/2"], says="shard"),
        Case("numbers:matrix-fix-timeout", ["matrix", "run", "{matrix}", "--fix-timeout", "0"], says="fix-timeout"),
        Case("numbers:testbed-jobs", ["testbed", "build", "-j", "many", "all"], says="-j"),
        Case("numbers:demo-jobs", ["demo", "-j", "x"], says="-j"),
        Case("numbers:ovf-cpu-count", ["inspect", "{ovf-bad-cpus}"], says="many"),
        Case("numbers:ovf-cpu-count-convert", ["convert", "{ovf-bad-cpus}", "-o", "{out}"], says="many"),
        # bad environment (decided before any launch or boot)
        Case("env:accel", ["accel"], says="h2k_accel", env={"H2K_ACCEL": "bogus"}),
        Case("env:inspect", ["inspect", "{good}"], says="h2k_accel", env={"H2K_ACCEL": "bogus"}),
        Case("env:linux-inspect", ["linux", "inspect", "{good}"], says="h2k_accel", env={"H2K_ACCEL": "bogus"}),
        Case("env:boot", ["boot", "{good}", "--timeout", "30"], says="h2k_accel", env={"H2K_ACCEL": "bogus"}),
        Case("env:domain", ["domain", "{good}", "--os", "linux", "--no-validate"], says="h2k_accel",
             env={"H2K_ACCEL": "bogus"}),
        # outputs
        Case("out:fix-into-missing-folder", ["fix", "{good}", "--drivers", "{pack}", "--bus", "virtio-blk",
                                             "-o", "{no-folder-out}"], says="folder"),
        Case("out:linux-fix-into-missing-folder", ["linux", "fix", "{good}", "-o", "{no-folder-out}"], says="folder"),
        Case("out:convert-into-missing-folder", ["convert", "{good}", "-o", "{no-folder-out}"], says="folder"),
        Case("out:domain-into-missing-folder", ["domain", "{good}", "--os", "linux", "--no-validate",
                                                "-o", "{no-folder-out}"], says="folder"),
        Case("out:fix-in-place-and-output", ["fix", "{good}", "--drivers", "{pack}", "--bus", "virtio-blk",
                                             "--in-place", "-o", "{out}"], says="not allowed with"),
        # other input files
        Case("file:fix-drivers-missing", ["fix", "{good}", "--drivers", "{missing}", "--bus", "virtio-blk"],
             says="missing.qcow2"),
        Case("file:metadata-missing", ["inspect", "{good}", "--metadata", "{missing}"], says="missing.qcow2"),
        Case("file:metadata-garbage", ["inspect", "{good}", "--metadata", "{garbage}"], says="garbage.json"),
        Case("file:plan-facts-garbage", ["plan", "{garbage}", "--drivers", "{pack}", "--bus", "virtio-blk"],
             says="garbage.json"),
        Case("file:domain-facts-garbage", ["domain", "{good}", "--facts", "{garbage}", "--no-validate"],
             says="garbage.json"),
        Case("file:boot-profile-garbage", ["boot", "{good}", "--profile-json", "{garbage}"], says="garbage.json"),
        Case("file:boot-cdrom-missing", ["boot", "{good}", "--cdrom", "{missing}"], says="missing.qcow2"),
        Case("file:matrix-run-missing", ["matrix", "run", "{missing}"], says="missing.qcow2"),
        Case("file:matrix-list-dir", ["matrix", "list", "{dir}"], says="folder.qcow2"),
        Case("file:matrix-list-empty", ["matrix", "list", "{empty}"], says="empty.qcow2"),
        Case("file:matrix-list-not-a-matrix", ["matrix", "list", "{not-a-matrix}"], says="m.yaml"),
        Case("file:matrix-list-unreadable", ["matrix", "list", "{unreadable}"], says="unreadable.qcow2"),
        Case("file:matrix-report-missing", ["matrix", "report", "{missing}"], says="missing.qcow2"),
        Case("file:matrix-report-garbage", ["matrix", "report", "{garbage}"], says="garbage.json"),
        Case("file:matrix-gate-garbage", ["matrix", "gate", "--baseline", "{garbage}", "--candidate", "{garbage}"],
             says="garbage.json"),
        Case("file:matrix-run-image-missing", ["matrix", "run", "{matrix}", "--image-path", "a={missing}"],
             says="missing.qcow2"),
        Case("file:testbed-unknown", ["testbed", "build", "no-such-artefact"], says="no-such-artefact"),
    ]
    return out


@pytest.fixture()
def trap(tmp_path_factory) -> Path:
    """A stand-in for QEMU and the libguestfs hypervisor: leaves a mark, then fails."""
    d = tmp_path_factory.mktemp("trap")
    script = d / "qemu-system-x86_64"
    script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {d / 'launched'}\nexit 1\n")
    script.chmod(0o755)
    return d


def test_every_subcommand_is_in_the_table() -> None:
    listed = {cmd for cmds in COMMAND_MODULES.values() for cmd in cmds}
    covered = {c.argv[0] for c in cases() if c.argv}
    assert listed - covered == {"demo"} or listed <= covered | {"demo"}, listed - covered
    assert any(c.argv[:1] == ["demo"] for c in cases())
    for group, actions in (("linux", {"inspect", "fix", "verify", "rollback"}), ("matrix", {"run", "list", "report", "gate"}),
                           ("testbed", {"list", "build"})):
        assert actions <= {c.argv[1] for c in cases() if c.argv[:1] == [group] and len(c.argv) > 1}, group


def test_every_bad_input_is_one_line_with_its_exit_code(tmp_path, trap) -> None:
    files = _files(tmp_path)
    todo = cases()
    env = dict(os.environ, PATH=f"{trap}{os.pathsep}{os.environ['PATH']}", LIBGUESTFS_HV=str(trap / "qemu-system-x86_64"),
               H2K_ACCEL="tcg", H2K_QUIET="1", PYTHONPATH=str(ROOT))

    def run(case: Case):
        fill = {"{" + k + "}": str(v) for k, v in files.items()}
        argv = []
        for a in case.argv:
            for k, v in fill.items():
                a = a.replace(k, v)
            argv.append(a)
        if "X" in argv:
            bad = case.id.split(":", 1)[1]
            argv = [str(files[bad]) if a == "X" else a for a in argv]
        proc = subprocess.run([sys.executable, "-m", "h2k", *argv], capture_output=True, text=True, timeout=120,
                              env=dict(env, **case.env), cwd=tmp_path)
        return case, argv, proc

    problems = []
    with ThreadPoolExecutor(4) as pool:
        for case, argv, proc in pool.map(run, todo):
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("h2k: error: ")]
            says = case.says.lower()
            if says == "x":
                says = Path(argv[argv.index(next(a for a in argv if "/" in a))]).name.lower()
            ok = (proc.returncode == case.code and len(errors) == 1 and "Traceback" not in proc.stderr
                  and says in errors[0].lower())
            if not ok:
                problems.append(f"{case.id}: h2k {' '.join(argv)}\n  exit {proc.returncode} (want {case.code}), "
                                f"stderr: {proc.stderr.strip()[-600:]}")
    launched = trap / "launched"
    assert not problems, f"{len(problems)} of {len(todo)} cases:\n" + "\n".join(problems)
    assert not launched.exists(), f"a case launched QEMU or the appliance:\n{launched.read_text()}"


def test_a_libguestfs_failure_is_one_line(tmp_path, trap) -> None:
    """The appliance cannot start (its hypervisor fails at once): an engine error, one line, exit 2."""
    disk = tmp_path / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    env = dict(os.environ, LIBGUESTFS_HV=str(trap / "qemu-system-x86_64"), H2K_ACCEL="tcg", PYTHONPATH=str(ROOT))
    for argv in (["inspect", str(disk)], ["linux", "inspect", str(disk)]):
        proc = subprocess.run([sys.executable, "-m", "h2k", *argv], capture_output=True, text=True, env=env,
                              timeout=120)
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("h2k: error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "libguestfs could not start its appliance" in errors[0] and "exited with error status 1" in errors[0]
    assert (trap / "launched").exists()  # it really was libguestfs starting its hypervisor that failed
