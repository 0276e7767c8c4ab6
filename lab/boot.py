"""The lab's public API: boot a disk (or a kernel) with a machine profile and get a verdict.

    from lab.boot import boot, BootResult, Expect
    result = boot(image, profile, timeout=600, outdir=Path("out"))

Each boot runs on its own qcow2 overlay in a private temp dir (unique sockets,
no ports), leaves serial.log, qmp.jsonl, qemu.log, firmware.log, screen.png
and verdict.json in ``outdir``, and stops everything it started.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ContextManager

from h2k.errors import InputError
from h2k.profile import MachineProfile
from lab import backend_qemu
from lab.verdict import BOOT_OK_MARKER, BUILTIN_FAILURES, BootResult, Expect, Pattern

__all__ = ["boot", "boot_two_phase", "BootResult", "Expect", "Pattern", "BOOT_OK_MARKER", "BUILTIN_FAILURES"]

BACKENDS = ("qemu", "libvirt")


def boot(
    image: Path | None,
    profile: MachineProfile,
    *,
    timeout: float,
    outdir: Path,
    expect: Expect | None = None,
    backend: str = "qemu",
    connect: str | None = None,
    vars_file: Path | None = None,
    shutdown_on_pass: bool = False,
) -> BootResult:
    """Boot ``image`` (None: direct kernel boot only) and score it. Never writes ``image``.

    ``vars_file``: UEFI NVRAM to use (created from the template if missing) and keep.
    ``shutdown_on_pass``: after passing, power the guest off cleanly (agent, else ACPI)
    and fail if it does not.
    """
    return _boot(image, profile, timeout=timeout, outdir=outdir, expect=expect, backend=backend, connect=connect,
                 vars_file=vars_file, shutdown_on_pass=shutdown_on_pass)


def _boot(image: Path | None, profile: MachineProfile, *, timeout: float, outdir: Path, expect: Expect | None,
          backend: str, connect: str | None, vars_file: Path | None, shutdown_on_pass: bool,
          phase_disk: Any = None) -> BootResult:
    """``boot``; ``phase_disk`` (a backend's disk of a two-phase run) is booted instead of a copy of ``image``."""
    expect = expect if expect is not None else Expect()
    if timeout <= 0:
        raise InputError("timeout must be positive")
    if image is not None:
        image = Path(image)
        if not image.exists():
            raise InputError(f"{image}: no such disk image")
    outdir = Path(outdir)
    if backend == "qemu":
        if connect:
            raise InputError("--connect applies to the libvirt backend only")
        opts = backend_qemu.BootOptions(timeout=timeout, outdir=outdir, expect=expect, vars_file=vars_file,
                                        shutdown_on_pass=shutdown_on_pass, phase_disk=phase_disk)
        return backend_qemu.run(image, profile, opts)
    if backend == "libvirt":
        kwargs: dict[str, Any] = dict(timeout=timeout, outdir=outdir, expect=expect, connect=connect)
        if vars_file is not None:
            kwargs["vars_file"] = vars_file
        if shutdown_on_pass:
            kwargs["shutdown_on_pass"] = shutdown_on_pass
        if phase_disk is not None:
            kwargs["phase_disk"] = phase_disk
        return _libvirt_backend().boot(image, profile, **kwargs)
    raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def _libvirt_backend() -> ModuleType:
    try:
        return importlib.import_module("lab.backend_libvirt")
    except ImportError as exc:
        raise InputError(f"the libvirt backend is not available: {exc}") from exc


def _phase_disk(image: Path, backend: str, connect: str | None) -> ContextManager[Any]:
    """The one disk both phases of a two-phase run boot, made on ``image`` (never written)."""
    if backend == "qemu":
        if connect:
            raise InputError("--connect applies to the libvirt backend only")
        return backend_qemu.phase_overlay(image)
    if backend == "libvirt":
        return _libvirt_backend().phase_volume(image, connect=connect)
    raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def boot_two_phase(
    image: Path,
    bootstrap_profile: MachineProfile,
    final_profile: MachineProfile,
    *,
    timeout: float,
    outdir: Path,
    expect: Expect | None = None,
    final_expect: Expect | None = None,
    backend: str = "qemu",
    connect: str | None = None,
) -> BootResult:
    """Bootstrap to success, shut down cleanly, then boot the final profile.

    Both phases boot one disk, so the final phase sees what the bootstrap phase
    changed (drivers installed at first boot); the lab never writes ``image``:
    that disk is a temporary overlay on it (direct QEMU) or a copy of it uploaded
    once to the libvirt host, removed when the run ends, however it ends. A UEFI
    machine gets one NVRAM file (``outdir``/OVMF_VARS.fd), made from the template
    at bootstrap and kept for the final boot. ``timeout`` applies to each phase.
    Per-phase artefacts go to ``outdir``/bootstrap and /final.
    """
    if bootstrap_profile.firmware != final_profile.firmware:
        raise InputError("two-phase boot: the firmware must not change between phases")
    if timeout <= 0:
        raise InputError("timeout must be positive")
    image = Path(image)
    if not image.exists():
        raise InputError(f"{image}: no such disk image")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    vars_file = outdir / "OVMF_VARS.fd" if bootstrap_profile.uefi else None
    if vars_file is not None and vars_file.exists():
        vars_file.unlink()  # a fresh NVRAM per two-phase run, made from the template
    # Interrupts (SIGTERM too) unwind through the phase disk's cleanup, also between the phases.
    with backend_qemu.interrupt_guard(), _phase_disk(image, backend, connect) as disk:
        def phase(name: str, profile: MachineProfile, phase_expect: Expect | None, shutdown: bool) -> BootResult:
            return _boot(image, replace(profile, stage=name), timeout=timeout, outdir=outdir / name,
                         expect=phase_expect, backend=backend, connect=connect, vars_file=vars_file,
                         shutdown_on_pass=shutdown, phase_disk=disk)

        result = _two_phases(phase, bootstrap_profile, final_profile, outdir=outdir, expect=expect,
                             final_expect=final_expect, vars_file=vars_file, t0=t0)
    result.reason += "".join(f"; lab: {n}" for n in disk.lab_notes)  # what its removal left behind
    result.write(outdir)
    return result


def _two_phases(phase: Callable[[str, MachineProfile, Expect | None, bool], BootResult],
                bootstrap_profile: MachineProfile, final_profile: MachineProfile, *, outdir: Path,
                expect: Expect | None, final_expect: Expect | None, vars_file: Path | None, t0: float) -> BootResult:
    phases = []
    first = phase("bootstrap", bootstrap_profile, expect, True)
    phases.append({"phase": "bootstrap", **first.to_dict()})
    if not first.passed and first.verdict != "softfailed":
        return replace(first, reason=f"bootstrap phase: {first.reason}", phases=phases,
                       seconds=round(time.monotonic() - t0, 3))
    second = phase("final", final_profile, final_expect or expect, False)
    phases.append({"phase": "final", **second.to_dict()})
    result = replace(second, reason=f"final phase: {second.reason}", phases=phases,
                     seconds=round(time.monotonic() - t0, 3),
                     known_issues=first.known_issues + second.known_issues)
    if result.verdict == "passed" and first.verdict == "softfailed":
        result.verdict = "softfailed"
    result.artifacts = {**{f"final/{k}": v for k, v in second.artifacts.items()},
                        **{f"bootstrap/{k}": v for k, v in first.artifacts.items()}}
    if vars_file is not None:
        result.artifacts["OVMF_VARS.fd"] = str(vars_file)
    result.artifacts["verdict.json"] = str(outdir / "verdict.json")
    return result
