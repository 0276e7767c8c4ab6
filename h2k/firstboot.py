"""The first boot of a migrated Windows: what installs the staged drivers and the guest agent.

Pure planning (no disk): :func:`firstboot_changes` returns the files and registry
values ``h2k.plan`` adds to a plan. The mechanism (docs/windows-engine.md, "First
boot", says why it was chosen over virt-v2v's service):

* a **runner** (``h2k-firstboot.cmd``) run by a **scheduled task** (boot trigger, as
  SYSTEM, in the background, so it never holds the logon screen; Task Scheduler's
  ``ExecutionTimeLimit`` bounds a whole run). It works through ``steps.txt``: each
  step is a small ``steps\\<name>.cmd`` with a time limit, run under
  ``h2k-watchdog.ps1`` (kills the step's process tree past the limit), tried at most
  :data:`MAX_TRIES` times over all boots, marked done only on exit code 0. It logs
  to ``firstboot.log``, writes ``firstboot.status`` and, when nothing is pending,
  deletes its task and hooks.
* a **bootstrap** (``h2k-bootstrap.cmd``) that only registers and starts the task
  (``schtasks``, ``reg``: nothing that waits), started by one **hook**:

  - an image whose Windows Setup is idle: ``SYSTEM\\Setup\\CmdLine`` with
    ``SetupType``=2 (Winlogon runs it as SYSTEM before the logon screen); the
    bootstrap puts both values back as they were found;
  - a generalized or mid-setup image (``SYSTEM\\Setup`` is never written there):
    ``%WINDIR%\\Setup\\Scripts\\SetupComplete.cmd``, which Windows Setup runs as
    SYSTEM after OOBE; our lines go in front of an existing script, which then runs
    unchanged. Microsoft: SetupComplete.cmd does not run on images installed with an
    OEM product key, except Enterprise editions and Windows Server; for the other
    editions an HKLM ``RunOnce`` value starts the same bootstrap at the first
    administrator logon as well.

Scripts are ASCII with CRLF line ends (the task definition is UTF-16, as
``schtasks /xml`` reads it).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path

from h2k.changes import REG_DWORD, REG_SZ, FileWrite, RegValue
from h2k.errors import InputError
from h2k.facts import SetupState, WindowsFacts

TEMPLATES = Path(__file__).with_name("firstboot_templates")

TASK_NAME = "h2k-firstboot"
TASK_TIME_LIMIT = "PT2H"  # Task Scheduler stops a run that takes longer (the next boot resumes it)
MAX_TRIES = 3  # per step, over all boots
RETRY_PAUSE = 30  # seconds between two tries of a failed step
RUNONCE_KEY = "Microsoft\\Windows\\CurrentVersion\\RunOnce"
RUNONCE_VALUE = "h2k-firstboot"
SETUP_COMPLETE = "Setup/Scripts/SetupComplete.cmd"  # under the system root
BLOCK_BEGIN = b"@rem hyper2kvm first boot: begin"
BLOCK_END = b"@rem hyper2kvm first boot: end\r\n"

PNPUTIL_ADD_DRIVER_BUILD = 14393  # pnputil /add-driver ... /subdirs /install: Windows 10 1607 and later

# Exit codes a step accepts as success besides 0 (the step script maps them to 0).
PNPUTIL_OK = {3010: "done, restart needed", 259: "no device needed a newer driver (the packages are in the store)"}
MSIEXEC_OK = {3010: "done, restart needed", 1641: "done, restart started"}


@dataclass(frozen=True)
class Step:
    name: str  # steps\<name>.cmd; letters, digits and '-'
    limit: int  # seconds per try (the watchdog's limit)
    script: str  # cmd text; exits 0 on success
    why: str


@dataclass(frozen=True)
class Hook:
    """How the bootstrap is started."""

    kind: str  # "setup-cmdline" or "setupcomplete"
    runonce: bool  # also an HKLM RunOnce value (SetupComplete.cmd may be skipped: OEM keys)
    reason: str


def choose_hook(facts: WindowsFacts) -> Hook:
    """CmdLine when Windows Setup is idle; otherwise SetupComplete.cmd, plus RunOnce where it may not run
    (an OEM product key on a client edition, or no Windows Setup pass pending at all: someone
    else's CmdLine is waiting, and SetupComplete.cmd runs only at the end of Windows Setup)."""
    setup = facts.setup.without_h2k_hook()
    if setup.idle:
        return Hook("setup-cmdline", False, "Windows Setup is idle: SYSTEM\\Setup\\CmdLine with SetupType=2 "
                                            "runs the bootstrap once before logon, which then restores both values")
    why = (f"Windows Setup is not idle ({setup.describe()}): SYSTEM\\Setup is left as found; "
           "SetupComplete.cmd starts the bootstrap after OOBE")
    image = (setup.image_state or "IMAGE_STATE_COMPLETE").upper()
    setup_pending = (setup.kind == "generalized" or bool(setup.system_setup_in_progress)
                     or bool(setup.oobe_in_progress) or image != "IMAGE_STATE_COMPLETE")
    if not setup_pending:
        return Hook("setupcomplete", True, why + "; no Windows Setup pass is pending (another tool's CmdLine is): "
                    "an HKLM RunOnce value starts it at the first administrator logon too")
    edition = (facts.edition or "").lower()
    if facts.is_server or "server" in edition or edition.startswith("enterprise"):
        return Hook("setupcomplete", False, why)
    return Hook("setupcomplete", True, why + f"; {facts.edition or 'this edition'} may carry an OEM product key, "
                "with which SetupComplete.cmd does not run: an HKLM RunOnce value starts it at the first "
                "administrator logon too")


def crlf(text: str) -> bytes:
    """Scripts for cmd.exe/PowerShell 2: ASCII with CRLF line ends, never UTF-16."""
    body = "\r\n".join(text.replace("\r\n", "\n").split("\n"))
    return body.encode("ascii")


def render(template: str, **values: object) -> str:
    text = (TEMPLATES / template).read_text(encoding="ascii")
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"{template}: unrendered placeholders {leftover}")
    return text


# ------------------------------------------------------------------ steps


def driver_step(build: int, staging_win: str) -> Step:
    """pnputil by build: ``/add-driver ... /subdirs /install`` from 14393, ``-i -a`` per INF before."""
    pnputil = "%SystemRoot%\\System32\\pnputil.exe"
    if build >= PNPUTIL_ADD_DRIVER_BUILD:
        body = [
            f"rem pnputil /add-driver exists from Windows 10 1607 (build {PNPUTIL_ADD_DRIVER_BUILD}); this is build {build}",
            f'"{pnputil}" /add-driver "{staging_win}\\*.inf" /subdirs /install',
            "set RC=%ERRORLEVEL%",
            "echo pnputil /add-driver exit %RC%",
        ]
    else:
        body = [
            f"rem build {build} predates pnputil /add-driver (Windows 10 1607, build {PNPUTIL_ADD_DRIVER_BUILD}): "
            "pnputil -i -a, one INF at a time",
            "setlocal EnableDelayedExpansion",
            "set RC=0",
            f'for /r "{staging_win}" %%I in (*.inf) do (',
            f'  "{pnputil}" -i -a "%%I"',
            "  set R=!ERRORLEVEL!",
            "  echo pnputil -i -a %%~nxI exit !R!",
            '  if not "!R!"=="0" if not "!R!"=="3010" set RC=!R!',
            ")",
        ]
    ok = [f'if "%RC%"=="{code}" exit /b 0' for code in sorted(PNPUTIL_OK)]
    lines = ["@echo off", *body, *[f"rem {c}: {w}" for c, w in sorted(PNPUTIL_OK.items())], *ok, "exit /b %RC%"]
    return Step("drivers", 900, "\n".join(lines) + "\n",
                "install the staged driver packages (storage, network, balloon, serial, ...) with pnputil")


def agent_step(staging_win: str, msi: str) -> Step:
    lines = [
        "@echo off",
        f'start "" /wait "%SystemRoot%\\System32\\msiexec.exe" /i "{staging_win}\\guest-agent\\{msi}" '
        f'/qn /norestart /l*v "{staging_win}\\qemu-ga-install.log"',
        "set RC=%ERRORLEVEL%",
        "echo msiexec exit %RC%",
        *[f"rem {c}: {w}" for c, w in sorted(MSIEXEC_OK.items())],
        "rem 1618: another installation is running (tried again later)",
        *[f'if "%RC%"=="{code}" exit /b 0' for code in sorted(MSIEXEC_OK)],
        "exit /b %RC%",
    ]
    return Step("guest-agent", 600, "\n".join(lines) + "\n", "install the qemu guest agent MSI")


def network_step(staging_win: str) -> Step:
    lines = [
        "@echo off",
        'set "PS=%SystemRoot%\\System32\\WindowsPowerShell\\v1.0\\powershell.exe"',
        'if not exist "%PS%" (echo PowerShell missing: static IP not re-applied & exit /b 1)',
        f'"%PS%" -NoProfile -NonInteractive -ExecutionPolicy Bypass -File "{staging_win}\\h2k-network.ps1"',
        "exit /b %ERRORLEVEL%",
    ]
    return Step("network", 300, "\n".join(lines) + "\n", "re-apply the old NIC's static IP to the VirtIO NIC")


# ------------------------------------------------------------------ SetupComplete.cmd


def setup_complete_original(state: SetupState) -> bytes | None:
    """The image's own SetupComplete.cmd (our block, if a previous fix put it there, taken off)."""
    if state.setup_complete_size is None:
        return None
    if state.setup_complete_b64 is None:
        raise InputError(f"SetupComplete.cmd is {state.setup_complete_size} bytes: too large to chain")
    data = base64.b64decode(state.setup_complete_b64)
    if data.startswith(BLOCK_BEGIN):
        end = data.find(BLOCK_END)
        if end < 0:
            raise InputError("SetupComplete.cmd starts with hyper2kvm's block but does not end it: edited by hand?")
        data = data[end + len(BLOCK_END):]
    return data


def setup_complete_content(state: SetupState, bootstrap_win: str) -> bytes:
    """Our block, then the image's own script byte for byte (it runs as it did before)."""
    block = crlf(render("setupcomplete-block.cmd", TASK=TASK_NAME, BOOTSTRAP=bootstrap_win))
    assert block.startswith(BLOCK_BEGIN) and block.endswith(BLOCK_END)
    original = setup_complete_original(state)
    return block + (original if original is not None else b"")


# ------------------------------------------------------------------ all of it


def cmdline_hook(bootstrap_win: str, setup: SetupState) -> str:
    """Setup\\CmdLine for an idle image; it names what it replaced (``facts.H2K_CMDLINE_HOOK``),
    so the next inspection still knows the image's own values and a second fix writes the same."""
    before = setup.without_h2k_hook()
    st = "absent" if before.setup_type is None else "0"
    cl = "absent" if before.cmdline is None else "empty"
    return f'cmd.exe /c ""{bootstrap_win}" cmdline SetupType={st} CmdLine={cl}"'


def _restore_setup_lines(setup: SetupState) -> list[str]:
    """reg.exe lines that put SYSTEM\\Setup's CmdLine and SetupType back as found (idle image)."""
    setup = setup.without_h2k_hook()
    reg = '"%SYS%\\reg.exe"'
    key = '"HKLM\\SYSTEM\\Setup"'
    out = []
    if setup.setup_type is None:
        out.append(f"{reg} delete {key} /v SetupType /f >>\"%LOG%\" 2>&1")
    else:
        out.append(f"{reg} add {key} /v SetupType /t REG_DWORD /d {int(setup.setup_type)} /f >>\"%LOG%\" 2>&1")
    if setup.cmdline is None:
        out.append(f"{reg} delete {key} /v CmdLine /f >>\"%LOG%\" 2>&1")
    else:  # idle: empty
        out.append(f"{reg} add {key} /v CmdLine /t REG_SZ /d \"\" /f >>\"%LOG%\" 2>&1")
    return out


def task_xml(runner_win: str) -> bytes:
    xml = render("task.xml", TASK_LIMIT=TASK_TIME_LIMIT, RUNNER=runner_win)
    return "\ufeff".encode("utf-16-le") + xml.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-16-le")


def firstboot_changes(facts: WindowsFacts, staging: str, staging_win: str, system_root: str,
                      steps: list[Step]) -> tuple[list, Hook]:
    """Files and registry values of the first boot (``staging``, ``system_root``: guest paths;
    ``staging_win``: the staging folder as Windows sees it)."""
    hook = choose_hook(facts)
    bootstrap_win = f"{staging_win}\\h2k-bootstrap.cmd"
    runner_win = f"{staging_win}\\h2k-firstboot.cmd"
    restore = _restore_setup_lines(facts.setup) if hook.kind == "setup-cmdline" else ["rem nothing to restore"]
    changes: list = [
        FileWrite(f"{staging}/h2k-bootstrap.cmd",
                  crlf(render("bootstrap.cmd", STAGING=staging_win, TASK=TASK_NAME, MAX_TRIES=MAX_TRIES,
                              RESTORE="\n".join(restore))),
                  f"first-boot bootstrap ({hook.kind}): registers and starts the task, waits for nothing"),
        FileWrite(f"{staging}/h2k-firstboot.cmd",
                  crlf(render("runner.cmd", STAGING=staging_win, TASK=TASK_NAME, MAX_TRIES=MAX_TRIES,
                              PAUSE=RETRY_PAUSE, PAUSE_PINGS=RETRY_PAUSE + 1, RUNONCE=RUNONCE_VALUE,
                              TASK_LIMIT=TASK_TIME_LIMIT)),
                  f"first-boot runner: each step bounded by a watchdog, at most {MAX_TRIES} tries, done only on exit 0"),
        FileWrite(f"{staging}/h2k-watchdog.ps1", crlf(render("watchdog.ps1")),
                  "first-boot watchdog: kills a step's process tree past its time limit"),
        FileWrite(f"{staging}/{TASK_NAME}.xml", task_xml(runner_win),
                  f"scheduled task (at boot, SYSTEM, background, {TASK_TIME_LIMIT} per run) that runs the runner"),
        FileWrite(f"{staging}/steps.txt",
                  crlf("# step time-limit-in-seconds (run in this order)\n"
                       + "".join(f"{s.name} {s.limit}\n" for s in steps)),
                  "the first-boot steps and their time limits"),
    ]
    for s in steps:
        changes.append(FileWrite(f"{staging}/steps/{s.name}.cmd", crlf(s.script), f"first-boot step: {s.why}"))
    run_bootstrap = f'cmd.exe /c ""{bootstrap_win}" %s"'
    if hook.kind == "setup-cmdline":
        why = "run the first-boot bootstrap once as SYSTEM before logon (Winlogon runs Setup\\CmdLine while SetupType=2); it restores both"
        changes.append(RegValue("SYSTEM", "Setup", "CmdLine", REG_SZ, cmdline_hook(bootstrap_win, facts.setup), why))
        changes.append(RegValue("SYSTEM", "Setup", "SetupType", REG_DWORD, 2, why))
    else:
        dest = "/" + "/".join([system_root.strip("/"), SETUP_COMPLETE])
        changes.append(FileWrite(dest, setup_complete_content(facts.setup, bootstrap_win),
                                 "SetupComplete.cmd (run as SYSTEM after OOBE) starts the first-boot bootstrap"
                                 + (", then the image's own script, unchanged" if facts.setup.setup_complete_size is not None
                                    else "")))
        if hook.runonce:
            changes.append(RegValue("SOFTWARE", RUNONCE_KEY, RUNONCE_VALUE, REG_SZ, run_bootstrap % "runonce",
                                    "first administrator logon starts the bootstrap where SetupComplete.cmd may not "
                                    "run (OEM product key); a second start finds the task done"))
    return changes, hook
