"""The first-boot plan (h2k.firstboot through h2k.plan): hooks chosen from Windows Setup's state,
SetupComplete.cmd chained, pnputil syntax by build, bounded steps. Pure: no disk, no Windows.

What a real Windows does with these scripts (that they run, that the watchdog kills, that
Task Scheduler honours the limit) is a recorded shape: no Windows runs here.
"""

from __future__ import annotations

import base64
import re
import xml.etree.ElementTree as ET

import hivex
import pytest

from h2k import driverpack, firstboot, plan as planmod
from h2k.changes import FileWrite, RegValue
from h2k.errors import InputError
from h2k.facts import SetupState
from h2k.inspect import read_setup_state
from lab.testbed import virtio_win
from lab.testbed.hive import make_hive

from test_plan_facts import win7, win11, win2019

STAGE = "/Windows/Drivers/h2k-staging"
SETUP_COMPLETE = "/Windows/Setup/Scripts/SetupComplete.cmd"
# sysprep /generalize /oobe leaves these (Microsoft: "Windows Setup States", SYSTEM\Setup).
GENERALIZED = SetupState(cmdline="oobe\\windeploy.exe", setup_type=2, system_setup_in_progress=1, oobe_in_progress=1,
                         image_state="IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE")
TEMPLATE = b"@echo off\r\nrem template's own\r\nexit /b 0\r\n"


@pytest.fixture(scope="module")
def pack():
    return driverpack.open_pack(virtio_win.build_tree())


def with_script(state: SetupState, data: bytes) -> SetupState:
    return SetupState(**{**state.__dict__, "setup_complete_size": len(data),
                         "setup_complete_b64": base64.b64encode(data).decode()})


def writes(p) -> dict[str, FileWrite]:
    return {c.dest: c for c in p.changes if isinstance(c, FileWrite)}


def regs(p) -> dict[tuple[str, str, str], RegValue]:
    return {(c.hive, c.key, c.name): c for c in p.changes if isinstance(c, RegValue)}


# ------------------------------------------------------------------ Windows Setup's state


SYSPREP_REG = r"""Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SYSTEM\Setup]
"CmdLine"="oobe\\windeploy.exe"
"SetupType"=dword:00000002
"SystemSetupInProgress"=dword:00000001
"OOBEInProgress"=dword:00000001
"SetupPhase"=dword:00000000
"""
STATE_REG = r"""Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State]
"ImageState"="IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
"""


def test_setup_state_read_from_real_hives(tmp_path):
    system = make_hive(tmp_path / "SYSTEM", SYSPREP_REG, "HKEY_LOCAL_MACHINE\\SYSTEM", "SYSTEM")
    software = make_hive(tmp_path / "SOFTWARE", STATE_REG, "HKEY_LOCAL_MACHINE\\SOFTWARE", "SOFTWARE")
    s = read_setup_state(hivex.Hivex(str(system)), hivex.Hivex(str(software)))
    assert (s.cmdline, s.setup_type, s.system_setup_in_progress, s.oobe_in_progress, s.setup_phase) == (
        "oobe\\windeploy.exe", 2, 1, 1, 0)
    assert s.image_state == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE" and s.restart_setup is None
    assert s.kind == "generalized" and not s.idle


@pytest.mark.parametrize("state,kind", [
    (SetupState(), "complete"),
    (SetupState(setup_type=0, cmdline="", system_setup_in_progress=0, oobe_in_progress=0,
                image_state="IMAGE_STATE_COMPLETE"), "complete"),
    (GENERALIZED, "generalized"),
    (SetupState(image_state="IMAGE_STATE_GENERALIZE_RESEAL_TO_AUDIT"), "generalized"),
    (SetupState(image_state="IMAGE_STATE_SPECIALIZE_RESEAL_TO_OOBE", oobe_in_progress=1), "mid-setup"),
    (SetupState(image_state="IMAGE_STATE_UNDEPLOYABLE"), "mid-setup"),
    (SetupState(setup_type=2, cmdline="C:\\other\\firstboot.exe"), "mid-setup"),  # someone else's first boot
    (SetupState(cmdline="C:\\left\\over.cmd", setup_type=0), "mid-setup"),  # not ours to overwrite either
    (SetupState(audit_in_progress=1), "mid-setup"),
    (SetupState(mini_setup_in_progress=1), "mid-setup"),
])
def test_setup_kind(state, kind):
    assert state.kind == kind
    assert state.idle == (kind == "complete")


# ------------------------------------------------------------------ hooks


def test_idle_image_uses_setup_cmdline_and_restores_it(pack):
    p = planmod.build_plan(win2019(), pack, "virtio-blk")
    r = regs(p)
    assert r[("SYSTEM", "Setup", "SetupType")].data == 2
    assert r[("SYSTEM", "Setup", "CmdLine")].data.endswith('h2k-bootstrap.cmd" cmdline SetupType=absent CmdLine=absent"')
    assert SETUP_COMPLETE not in writes(p)
    boot = writes(p)[f"{STAGE}/h2k-bootstrap.cmd"].content.decode()
    # The values were absent: the bootstrap deletes them again (before logon, after registering the task).
    assert 'reg.exe" delete "HKLM\\SYSTEM\\Setup" /v SetupType /f' in boot
    assert 'reg.exe" delete "HKLM\\SYSTEM\\Setup" /v CmdLine /f' in boot
    idle = SetupState(setup_type=0, cmdline="", system_setup_in_progress=0, oobe_in_progress=0)
    boot = writes(planmod.build_plan(win2019(setup=idle), pack, "virtio-blk"))[f"{STAGE}/h2k-bootstrap.cmd"]
    assert 'add "HKLM\\SYSTEM\\Setup" /v SetupType /t REG_DWORD /d 0 /f' in boot.content.decode()
    assert 'add "HKLM\\SYSTEM\\Setup" /v CmdLine /t REG_SZ /d "" /f' in boot.content.decode()


@pytest.mark.parametrize("before", [SetupState(), SetupState(setup_type=0, cmdline="", system_setup_in_progress=0)])
def test_a_second_plan_sees_through_its_own_cmdline_hook(pack, before):
    """After a fix, SYSTEM\\Setup holds our hook (SetupType=2): inspection must still call the image
    idle, and the plan must write the same values and the same restore lines (a second fix: nothing)."""
    first = planmod.build_plan(win2019(setup=before), pack, "virtio-blk")
    r = regs(first)
    hooked = SetupState(**{**before.__dict__, "setup_type": r[("SYSTEM", "Setup", "SetupType")].data,
                           "cmdline": r[("SYSTEM", "Setup", "CmdLine")].data})
    assert hooked.h2k_hook and hooked.idle and hooked.kind == "complete" and hooked.without_h2k_hook() == before
    assert "first-boot hook is pending" in hooked.describe()
    second = planmod.build_plan(win2019(setup=hooked), pack, "virtio-blk")
    assert regs(second) == r
    assert writes(second) == writes(first)
    # Someone else's CmdLine that merely mentions our file is not ours.
    other = SetupState(setup_type=2, cmdline='cmd.exe /c "C:\\x\\h2k-bootstrap.cmd" cmdline')
    assert not other.h2k_hook and other.kind == "mid-setup"


@pytest.mark.parametrize("edition,server,runonce", [
    ("ServerStandard", True, False), ("ServerDatacenter", True, False),
    ("Enterprise", False, False), ("EnterpriseS", False, False),  # LTSC
    ("Professional", False, True), ("Core", False, True), ("Education", False, True),
])
def test_generalized_image_keeps_setup_and_chains_setupcomplete(pack, edition, server, runonce):
    f = win2019(setup=GENERALIZED, edition=edition, is_server=server,
                product_name="Windows Server 2019 Standard" if server else "Windows 10 Pro",
                build=17763)
    p = planmod.build_plan(f, pack, "virtio-blk")
    assert not [c for c in p.changes if isinstance(c, RegValue) and c.key.lower().startswith("setup")]
    # Storage binding still happens: it is what lets the template boot on VirtIO.
    assert regs(p)[("SYSTEM", "{CCS}\\Services\\viostor", "Start")].data == 0
    script = writes(p)[SETUP_COMPLETE].content
    assert script.startswith(firstboot.BLOCK_BEGIN) and script.endswith(firstboot.BLOCK_END)
    assert b'h2k-bootstrap.cmd" setupcomplete"' in script
    ro = regs(p).get(("SOFTWARE", firstboot.RUNONCE_KEY, firstboot.RUNONCE_VALUE))
    assert (ro is not None) == runonce
    if runonce:  # SetupComplete.cmd does not run with an OEM key on these editions
        assert ro.data.endswith('h2k-bootstrap.cmd" runonce"')
        assert any("OEM product key" in n for n in p.notes)
    assert any("left as found" in n for n in p.notes)


def test_someone_elses_pending_cmdline_is_kept_and_runonce_starts_ours(pack):
    """SetupType=2 with another tool's CmdLine and no Setup pass pending: SetupComplete.cmd would
    never run, so even a Server gets the RunOnce value; the other CmdLine is left alone."""
    other = SetupState(setup_type=2, cmdline="C:\\Tools\\provision.exe /once", image_state="IMAGE_STATE_COMPLETE")
    p = planmod.build_plan(win2019(setup=other), pack, "virtio-blk")
    assert not [c for c in p.changes if isinstance(c, RegValue) and c.key.lower().startswith("setup")]
    assert ("SOFTWARE", firstboot.RUNONCE_KEY, firstboot.RUNONCE_VALUE) in regs(p)
    assert SETUP_COMPLETE in writes(p)


def test_existing_setupcomplete_runs_after_ours_byte_for_byte_and_a_second_plan_is_identical(pack):
    odd = TEMPLATE + b"rem \xe9t\xe9 (ANSI), no final newline"
    f = win2019(setup=with_script(GENERALIZED, odd))
    first = writes(planmod.build_plan(f, pack, "virtio-blk"))[SETUP_COMPLETE].content
    assert first.endswith(odd) and first.index(firstboot.BLOCK_END) + len(firstboot.BLOCK_END) == len(first) - len(odd)
    # Inspected again after the fix, the script starts with our block: the plan takes it off and
    # writes the same bytes (so the second fix finds the file identical and skips it).
    again = writes(planmod.build_plan(win2019(setup=with_script(GENERALIZED, first)), pack, "virtio-blk"))
    assert again[SETUP_COMPLETE].content == first


def test_setupcomplete_that_cannot_be_chained_is_refused(pack):
    big = SetupState(**{**GENERALIZED.__dict__, "setup_complete_size": 5 << 20})
    with pytest.raises(InputError, match="too large to chain"):
        planmod.build_plan(win2019(setup=big), pack, "virtio-blk")
    cut = firstboot.BLOCK_BEGIN + b" (registers ...)\r\n@rem something else\r\n"
    with pytest.raises(InputError, match="does not end it"):
        planmod.build_plan(win2019(setup=with_script(GENERALIZED, cut)), pack, "virtio-blk")


# ------------------------------------------------------------------ pnputil by build


@pytest.mark.parametrize("facts,modern", [
    (win7(), False),  # 7601
    (win7(build=9200, minor=2, product_name="Windows 8 Pro"), False),
    (win7(build=9600, minor=3, product_name="Windows 8.1 Pro", has_driver_database=True), False),
    (win11(build=10240, product_name="Windows 10 Pro"), False),  # 1507
    (win11(build=10586, product_name="Windows 10 Pro"), False),  # 1511
    (win11(build=14393, product_name="Windows 10 Enterprise 2016 LTSB"), True),  # 1607: first with /add-driver
    (win2019(), True),
    (win11(), True),
])
def test_pnputil_syntax_by_build(pack, facts, modern):
    step = writes(planmod.build_plan(facts, pack, "virtio-blk"))[f"{STAGE}/steps/drivers.cmd"].content.decode()
    commands = [line.strip() for line in step.splitlines() if "pnputil.exe\"" in line]
    assert len(commands) == 1
    if modern:
        assert commands[0] == ('"%SystemRoot%\\System32\\pnputil.exe" /add-driver '
                               '"C:\\Windows\\Drivers\\h2k-staging\\*.inf" /subdirs /install')
    else:
        assert commands[0] == '"%SystemRoot%\\System32\\pnputil.exe" -i -a "%%I"'
        assert 'for /r "C:\\Windows\\Drivers\\h2k-staging" %%I in (*.inf) do (' in step
    # Success is exit 0 (or 3010 restart needed, 259 nothing newer to install); anything else is
    # returned to the runner, which tries again and never marks the step done.
    assert step.rstrip().splitlines()[-1] == "exit /b %RC%"
    assert set(re.findall(r'if "%RC%"=="(\d+)" exit /b 0', step)) == {"259", "3010"}


# ------------------------------------------------------------------ the runner's bounds


def test_runner_bounds_every_step(pack):
    w = writes(planmod.build_plan(win2019(), pack, "virtio-blk"))
    runner = w[f"{STAGE}/h2k-firstboot.cmd"].content.decode()
    # The try counter is written before the try (a hang or a reboot still counts) ...
    body = runner[runner.index(":step_try"):runner.index(":step_done")]
    assert body.index(f"if %TRIES% GEQ {firstboot.MAX_TRIES} goto step_failed") < body.index("set /a TRIES+=1") \
        < body.index('>"%STATE%\\%NAME%.tries" echo %TRIES%') < body.index("h2k-watchdog.ps1")
    # ... the only way to "done" is exit code 0 ...
    assert runner.count("goto step_done") == 1 and 'if "%RC%"=="0" goto step_done' in runner
    assert runner.count('%NAME%.done" echo') == 1
    # ... and every try runs under the watchdog with the step's own limit.
    assert '-File "%H2K%\\h2k-watchdog.ps1" -Seconds %LIMIT% -Script "%H2K%\\steps\\%NAME%.cmd"' in runner
    limits = dict(line.split() for line in w[f"{STAGE}/steps.txt"].content.decode().splitlines()[1:] if line)
    assert {k: int(v) for k, v in limits.items()} == {"drivers": 900, "guest-agent": 600, "network": 300}
    worst = sum((int(v) + firstboot.RETRY_PAUSE) * firstboot.MAX_TRIES for v in limits.values())
    assert worst < 3 * 3600  # a whole first boot, every step failing every time, ends within hours
    # Done: the task and the hooks go away.
    finish = runner[runner.index(":finish"):]
    assert f'schtasks.exe" /delete /tn {firstboot.TASK_NAME} /f' in finish
    assert f'/v {firstboot.RUNONCE_VALUE} /f' in finish
    watchdog = w[f"{STAGE}/h2k-watchdog.ps1"].content.decode()
    assert "WaitForExit($Seconds * 1000)" in watchdog and "/T /F" in watchdog and "exit 1460" in watchdog


def test_bootstrap_only_registers_and_starts_the_task(pack):
    boot = writes(planmod.build_plan(win2019(), pack, "virtio-blk"))[f"{STAGE}/h2k-bootstrap.cmd"].content.decode()
    programs = set(re.findall(r'"%SYS%\\(\w+\.exe)"', boot))
    assert programs == {"schtasks.exe", "reg.exe"}  # nothing that can wait: no pnputil, msiexec, PowerShell
    assert f"/create /tn {firstboot.TASK_NAME} /xml" in boot and f"/run /tn {firstboot.TASK_NAME}" in boot
    assert boot.rstrip().splitlines()[-1] == "exit /b 0"


def test_task_definition(pack):
    xml = writes(planmod.build_plan(win2019(), pack, "virtio-blk"))[f"{STAGE}/h2k-firstboot.xml"].content
    assert xml.startswith(b"\xff\xfe")  # UTF-16 LE with BOM, as schtasks /xml reads it
    root = ET.fromstring(xml.decode("utf-16").replace('encoding="UTF-16"', ""))
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    assert root.find("t:Triggers/t:BootTrigger", ns) is not None
    assert root.findtext("t:Principals/t:Principal/t:UserId", namespaces=ns) == "S-1-5-18"
    assert root.findtext("t:Settings/t:ExecutionTimeLimit", namespaces=ns) == firstboot.TASK_TIME_LIMIT
    assert root.findtext("t:Settings/t:MultipleInstancesPolicy", namespaces=ns) == "IgnoreNew"
    assert root.findtext("t:Actions/t:Exec/t:Arguments", namespaces=ns) == \
        '/c "C:\\Windows\\Drivers\\h2k-staging\\h2k-firstboot.cmd"'


def test_every_script_is_ascii_crlf_without_placeholders(pack):
    for f in (win2019(), win7(), win2019(setup=with_script(GENERALIZED, TEMPLATE), edition="Professional",
                                          is_server=False)):
        for dest, change in writes(planmod.build_plan(f, pack, "virtio-blk")).items():
            if dest.endswith(".xml"):
                continue
            text = change.content.decode("ascii")
            assert b"\n" not in change.content.replace(b"\r\n", b""), dest
            assert not re.search(r"@[A-Z_]+@", text), dest


def test_runonce_value_added_beside_the_images_own(tmp_path, pack):
    """Applied to a real SOFTWARE hive (hivex): the image's RunOnce entries stay as they were."""
    from h2k import registry

    text = ("Windows Registry Editor Version 5.00\r\n\r\n"
            "[HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\RunOnce]\r\n"
            '"ContosoAgent"="C:\\\\Contoso\\\\setup.exe /quiet"\r\n')
    software = make_hive(tmp_path / "SOFTWARE", text, "HKEY_LOCAL_MACHINE\\SOFTWARE", "SOFTWARE")
    before = registry.snapshot(software)
    f = win2019(setup=GENERALIZED, edition="Professional", is_server=False, product_name="Windows 10 Pro")
    registry.apply_changes(software, "SOFTWARE", planmod.build_plan(f, pack, "virtio-blk").changes)
    after = registry.snapshot(software)
    key = firstboot.RUNONCE_KEY.lower()
    assert after[key]["contosoagent"] == before[key]["contosoagent"]
    assert set(after[key]) == {"contosoagent", firstboot.RUNONCE_VALUE}
    assert registry.decode(*registry.read_value(software, firstboot.RUNONCE_KEY, firstboot.RUNONCE_VALUE)) == \
        'cmd.exe /c ""C:\\Windows\\Drivers\\h2k-staging\\h2k-bootstrap.cmd" runonce"'
    assert {k for k in after if after[k] != before.get(k)} == {key}
