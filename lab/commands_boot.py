"""``h2k boot``: boot a disk image with a machine profile and print a one-line verdict.

Exit status: 0 only when the verdict is ``passed``; 1 for softfailed, failed,
incomplete or timeout; 2/3 for errors in the lab or the input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from h2k import domain
from h2k.commands.argtypes import positive_int
from h2k.errors import InputError
from h2k.image import DiskImage, open_image
from h2k.profile import DISK_BUSES, FIRMWARES, NIC_MODELS, MachineProfile
from lab.boot import BACKENDS, boot, boot_two_phase
from lab.guestos import os_family_of
from lab.verdict import BUILTIN_FAILURES, EVIDENCE, Expect, Pattern, check_max_reboots, parse_success


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "boot",
        help="boot a disk under QEMU (or libvirt), watch console/QMP/agent, print a verdict",
        description=(
            "Boot IMAGE on a copy-on-write overlay (the image is never written) with a machine profile, "
            "watch the serial console, QMP events and the guest agent, and print a one-line verdict: "
            "passed, softfailed, failed (with a bugcheck code and name), incomplete or timeout. "
            "Evidence (serial.log, qmp.jsonl, qemu.log, screen.png, verdict.json) goes to --outdir. "
            "Exits 0 only when the boot passed."
        ),
    )
    p.add_argument("image", nargs="?", help="disk image (any format qemu-img reads); omit with --kernel")
    p.add_argument("--profile", choices=("bootstrap", "final"), default="final",
                   help="bootstrap: SATA (IDE with --bus ide) + e1000e + driver ISO; final: VirtIO (default)")
    p.add_argument("--profile-json", type=Path, metavar="FILE",
                   help="a MachineProfile as JSON (e.g. written by the engine); overrides --profile and friends")
    p.add_argument("--os", choices=("auto", "windows", "linux"), default="auto",
                   help="guest OS family: Windows gets Hyper-V enlightenments incl. hv-crash; it also chooses "
                        "what counts as success (see --success). auto (default): linux for --kernel, else "
                        "libguestfs inspection of IMAGE (one read-only appliance launch)")
    p.add_argument("--firmware", choices=FIRMWARES, default="bios", help="never changed by a migration (default: bios)")
    p.add_argument("--bus", choices=DISK_BUSES, help="disk bus (default: sata for bootstrap, virtio-blk for final)")
    p.add_argument("--nic", choices=NIC_MODELS, help="NIC model (default: e1000e for bootstrap, virtio-net for final)")
    p.add_argument("--final-bus", choices=("virtio-blk", "virtio-scsi"), default="virtio-blk",
                   help="with --two-phase: the final phase's disk bus")
    p.add_argument("--cdrom", action="append", default=[], metavar="ISO", help="attach an ISO (repeatable)")
    p.add_argument("--memory", type=positive_int, metavar="MB", help="guest memory in MiB")
    p.add_argument("--cpus", type=positive_int, help="virtual CPUs")
    p.add_argument("--tpm", action="store_true", help="attach a swtpm TPM 2.0")
    p.add_argument("--kernel", help="direct kernel boot (lab test guests)")
    p.add_argument("--initrd", help="initramfs for --kernel")
    p.add_argument("--append", help="kernel command line for --kernel")
    p.add_argument("--timeout", type=float, default=600, help="seconds until the verdict is timeout (default: 600)")
    p.add_argument("--two-phase", action="store_true",
                   help="bootstrap to success, shut down cleanly, then boot the final profile (one NVRAM)")
    p.add_argument("--backend", choices=BACKENDS, default="qemu", help="direct QEMU (default) or libvirt")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (with --backend libvirt)")
    p.add_argument("--outdir", type=Path, help="where the evidence goes (default: a new dir under /tmp)")
    p.add_argument("--success", action="append", default=[], metavar="EVIDENCE[+EVIDENCE...]",
                   help="what passes the boot: evidence names joined by '+' must all be seen; repeat the option "
                        "for alternatives (the first complete one passes). Evidence: " + ", ".join(EVIDENCE)
                        + ". Default per OS: linux login | systemd-target | agent; windows ems | agent "
                        "(two-phase: agent)")
    p.add_argument("--expect-pattern", action="append", default=[], metavar="REGEX",
                   help="console regex for the 'pattern' evidence (repeatable, any one matches); without "
                        "--success it alone decides success")
    p.add_argument("--fail-pattern", action="append", default=[], metavar="NAME=REGEX",
                   help="extra console regex meaning failure (repeatable)")
    p.add_argument("--known-issue", action="append", default=[], metavar="NAME=REGEX",
                   help="console regex for a known, non-fatal problem: a pass becomes softfailed (repeatable)")
    p.add_argument("--require-agent", action="store_true",
                   help="the guest agent must answer (adds 'agent' to every success alternative)")
    p.add_argument("--require-network", action="store_true",
                   help="an IPv4 address on a NIC and a ping of the gateway from inside the guest "
                        "(adds 'network', which implies the agent, to every success alternative)")
    p.add_argument("--max-reboots", metavar="N",
                   help="guest-initiated reboots allowed before success (the lab lets the guest restart and "
                        "scores on, same deadline); one more is a reboot loop. Default per OS: linux 0, "
                        "windows 3 (a generalized Windows restarts during setup and driver installation)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead of one line")
    p.set_defaults(func=run)


def _named(items: list[str], verdict: str) -> list[Pattern]:
    out = []
    for item in items:
        name, sep, regex = item.partition("=")
        if not sep or not name or not regex:
            raise InputError(f"{item!r}: expected NAME=REGEX")
        try:
            out.append(Pattern(name, regex, verdict))
        except Exception as exc:  # re.error, ValueError
            raise InputError(f"{item!r}: {exc}") from None
    return out


def _profile(args: argparse.Namespace, stage: str, bus: str | None, nic: str | None) -> MachineProfile:
    meta = {"os": args.os, "firmware": args.firmware, "name": Path(args.image).stem if args.image else "kernel"}
    iso = args.cdrom[0] if args.cdrom else None
    if stage == "bootstrap":
        prof = domain.bootstrap_profile(meta, bus=bus or "sata", nic=nic or "e1000e", virtio_iso=iso,
                                        memory_mb=args.memory, cpus=args.cpus)
        prof.cdroms = list(args.cdrom)
    else:
        b = bus or "virtio-blk"
        if b in domain.FINAL_BUSES:
            prof = domain.final_profile(meta, bus=b, nic=nic or "virtio-net", memory_mb=args.memory, cpus=args.cpus)
        else:  # any bus, e.g. to reproduce the 0x7B of an unconverted disk
            prof = domain.final_profile(meta, nic=nic or "virtio-net", memory_mb=args.memory, cpus=args.cpus)
            prof = MachineProfile.from_dict({**prof.to_dict(), "disk_bus": b,
                                             "machine_type": "pc" if b == "ide" else prof.machine_type})
        prof.cdroms = list(args.cdrom)
    if args.tpm:
        prof.tpm = True
    if args.kernel:
        prof.kernel, prof.initrd, prof.append = args.kernel, args.initrd, args.append
    return prof


def _auto_os(args: argparse.Namespace, image: DiskImage | None) -> str:
    """--os auto: a kernel boot is Linux; a disk is whatever libguestfs inspection finds on it."""
    if image is not None and not args.kernel:
        family, found = os_family_of(image)
        print(f"h2k boot: --os {family} (libguestfs inspection found {found})", file=sys.stderr)
        return family
    return "linux"


def run(args: argparse.Namespace) -> int:
    if not args.image and not args.kernel and not args.profile_json:
        raise InputError("give a disk IMAGE or --kernel")
    if args.image and not Path(args.image).exists():
        raise InputError(f"{args.image}: no such disk image")
    for iso in args.cdrom:
        if not Path(iso).is_file():
            raise InputError(f"--cdrom {iso}: no such file")
    if args.timeout <= 0:
        raise InputError("--timeout must be positive")
    if args.connect and args.backend != "libvirt":
        raise InputError("--connect needs --backend libvirt")
    success = parse_success(args.success) if args.success else None
    max_reboots = None if args.max_reboots is None else check_max_reboots(args.max_reboots, "--max-reboots")
    failures = list(BUILTIN_FAILURES) + _named(args.fail_pattern, "failed")
    known = _named(args.known_issue, "softfailed")

    def expect_for(family: str, first_boot: bool = False) -> Expect:
        return Expect.for_os(family, first_boot=first_boot, success=success,
                             success_patterns=list(args.expect_pattern), failure_patterns=failures,
                             known_issues=known, require_agent=args.require_agent or args.require_network,
                             require_network=args.require_network, max_reboots=max_reboots)

    expect_for("linux" if args.os == "auto" else args.os)  # bad input ends here, before any inspection or boot
    given_profile = None
    if args.profile_json:
        try:
            given_profile = MachineProfile.from_dict(json.loads(args.profile_json.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{args.profile_json}: not a machine profile: {exc}") from None
    image = open_image(args.image) if args.image else None  # the front door, before anything is created
    if args.os == "auto":
        args.os = _auto_os(args, image)
    expect = expect_for(args.os)
    outdir = args.outdir or Path(tempfile.mkdtemp(prefix="h2k-boot-out-"))
    profile = given_profile if given_profile is not None else _profile(args, args.profile, args.bus, args.nic)
    if args.two_phase:
        if image is None:
            raise InputError("--two-phase needs a disk IMAGE")
        first = _profile(args, "bootstrap", args.bus if args.bus in ("sata", "ide") else None, None)
        final = _profile(args, "final", args.final_bus, None)
        # A Windows two-phase boot runs h2k's first-boot installer: only the agent shows it has run.
        phase_expect = expect_for(args.os, first_boot=True)
        result = boot_two_phase(image, first, final, timeout=args.timeout, outdir=outdir, expect=phase_expect,
                                backend=args.backend, connect=args.connect)
    else:
        result = boot(image, profile, timeout=args.timeout, outdir=outdir, expect=expect,
                      backend=args.backend, connect=args.connect)
    if args.json:
        print(result.to_json())
    else:
        stop = ""
        if result.stop_code is not None:
            stop = f" [{result.stop_code_hex}{' ' + result.stop_name if result.stop_name else ''}]"
        print(f"{result.verdict}: {result.reason}{stop} ({result.seconds:.1f}s, evidence in {outdir})")
    sys.stdout.flush()
    return 0 if result.passed else 1
