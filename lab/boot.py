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

from h2k.errors import InputError
from h2k.image import DiskImage, as_image
from h2k.profile import MachineProfile
from lab import backend_qemu
from lab.verdict import BOOT_OK_MARKER, BUILTIN_FAILURES, BootResult, Expect, Pattern

__all__ = ["boot", "boot_two_phase", "BootResult", "Expect", "Pattern", "BOOT_OK_MARKER", "BUILTIN_FAILURES"]

BACKENDS = ("qemu", "libvirt")


def boot(
    image: DiskImage | Path | None,
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
    expect = expect if expect is not None else Expect()
    if timeout <= 0:
        raise InputError("timeout must be positive")
    if image is not None:
        image = as_image(image)  # the front door: a bad or hostile image is refused before anything starts
    outdir = Path(outdir)
    if backend == "qemu":
        if connect:
            raise InputError("--connect applies to the libvirt backend only")
        opts = backend_qemu.BootOptions(timeout=timeout, outdir=outdir, expect=expect, vars_file=vars_file,
                                        shutdown_on_pass=shutdown_on_pass)
        return backend_qemu.run(image, profile, opts)
    if backend == "libvirt":
        try:
            mod = importlib.import_module("lab.backend_libvirt")
        except ImportError as exc:
            raise InputError(f"the libvirt backend is not available: {exc}") from exc
        kwargs = dict(timeout=timeout, outdir=outdir, expect=expect, connect=connect)
        if vars_file is not None:
            kwargs["vars_file"] = vars_file
        if shutdown_on_pass:
            kwargs["shutdown_on_pass"] = shutdown_on_pass
        return mod.boot(image, profile, **kwargs)
    raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")


def boot_two_phase(
    image: DiskImage | Path,
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

    The lab never writes ``image``: both phases share one temporary overlay on
    it, so the final phase sees what the bootstrap phase changed (drivers
    installed at first boot), and each phase adds its own per-boot overlay on
    top. A UEFI machine gets one NVRAM file (``outdir``/OVMF_VARS.fd), made from
    the template at bootstrap and kept for the final boot. ``timeout`` applies
    to each phase. Per-phase artefacts go to ``outdir``/bootstrap and /final.
    """
    if bootstrap_profile.firmware != final_profile.firmware:
        raise InputError("two-phase boot: the firmware must not change between phases")
    image = as_image(image)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    vars_file = outdir / "OVMF_VARS.fd" if bootstrap_profile.uefi else None
    if vars_file is not None and vars_file.exists():
        vars_file.unlink()  # a fresh NVRAM per two-phase run, made from the template
    # The bootstrap phase's writes must survive into the final phase: both boot
    # a shared overlay on the image (the image itself stays untouched).
    workdir = backend_qemu.make_workdir()
    try:
        disk = backend_qemu.create_overlay(image, workdir / "phases.qcow2")
        return _two_phases(disk, bootstrap_profile, final_profile, timeout=timeout, outdir=outdir, expect=expect,
                           final_expect=final_expect, backend=backend, connect=connect, vars_file=vars_file, t0=t0)
    finally:
        backend_qemu.remove_workdir(workdir)


def _two_phases(disk: DiskImage, bootstrap_profile: MachineProfile, final_profile: MachineProfile, *, timeout: float,
                outdir: Path, expect: Expect | None, final_expect: Expect | None, backend: str,
                connect: str | None, vars_file: Path | None, t0: float) -> BootResult:
    phases = []
    first = boot(disk, replace(bootstrap_profile, stage="bootstrap"), timeout=timeout, outdir=outdir / "bootstrap",
                 expect=expect, backend=backend, connect=connect, vars_file=vars_file, shutdown_on_pass=True)
    phases.append({"phase": "bootstrap", **first.to_dict()})
    if not first.passed and first.verdict != "softfailed":
        result = replace(first, reason=f"bootstrap phase: {first.reason}", phases=phases,
                         seconds=round(time.monotonic() - t0, 3))
        result.write(outdir)
        return result
    second = boot(disk, replace(final_profile, stage="final"), timeout=timeout, outdir=outdir / "final",
                  expect=final_expect or expect, backend=backend, connect=connect, vars_file=vars_file)
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
    result.write(outdir)
    return result
