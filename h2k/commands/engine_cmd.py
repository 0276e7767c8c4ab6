"""``h2k inspect | fix | verify | rollback``: the Windows engine (Linux disks go to h2k.linux).

Exit codes: 0 ok; 1 verify found a FAIL; 2 engine error; 3 bad input (unreadable
image, no OS, corrupt hive, bad pack); 4 blocker (hibernated, Fast Startup,
BitLocker, dynamic disk). Every failure prints one line ``h2k: error: <cause>``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from h2k.commands.report_out import require_ready, show
from h2k.errors import H2KError, InputError
from h2k.inspect import NotWindows, blocker_error


def _linux(func: str, exc: NotWindows, *, any_os: bool = False):
    """The h2k.linux function for a non-Windows disk, or re-raise the NotWindows error."""
    try:
        mod = importlib.import_module("h2k.linux")
    except ImportError:
        raise exc from None
    fn = getattr(mod, func, None)
    if fn is None or (exc.os_type != "linux" and not any_os):
        raise exc

    def guarded(*args, **kwargs):
        # The Linux pipeline's own H2KErrors pass through; a raw libguestfs error becomes one line.
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            last = (str(err).strip().splitlines() or ["failed"])[-1]
            raise H2KError(f"{exc} and the Linux pipeline could not handle it: {last}") from None

    return guarded


def cmd_inspect(args: argparse.Namespace) -> int:
    from h2k.inputs.cli_support import engine_input

    with engine_input(args.image, args.metadata) as (disk, meta, _res):  # any input: .ova/.vmx/.ovf/.xml/disk
        return _inspect(args, disk, meta)


def _inspect(args: argparse.Namespace, disk: str, meta: dict | None) -> int:
    from h2k.inspect import inspect_image, summary

    try:
        facts = inspect_image(disk, meta)
    except NotWindows as exc:
        result = _linux("inspect_image", exc)(disk)
        show(result, args.json)
        return 0
    if args.json:
        show(facts, True)
    else:
        print(summary(facts))
    err = blocker_error(facts)
    if err is not None:
        raise err
    return 0


def _planner(args: argparse.Namespace):
    """facts -> Plan, with the driver pack opened once (errors are InputError from the planner)."""
    from h2k.driverpack import open_pack
    from h2k.plan import build_plan

    # Opened before the launch, so a bad pack fails in a second; a Linux guest needs none.
    pack = open_pack(args.drivers) if args.drivers else None

    def plan(facts):
        if pack is None:
            raise InputError(f"{args.image}: a Windows guest ({facts.product_name or 'Windows'}) needs "
                             "--drivers (a virtio-win directory, ISO or manifest)")
        return build_plan(facts, pack, args.bus)

    return plan


def cmd_fix(args: argparse.Namespace) -> int:
    from pathlib import Path

    from h2k.inputs.cli_support import default_fix_output, engine_input

    if args.in_place and args.output:
        raise InputError("--in-place and -o/--output exclude each other")
    from h2k.inputs.source import input_kind

    # An OVA is unpacked next to the output (default VM.h2k.qcow2 beside it), so the space it
    # needs is on the output's file system, not in a possibly small /tmp.
    is_ova = os.path.isfile(args.image) and input_kind(args.image) == "ova"
    if is_ova and args.in_place:  # refuse before unpacking anything
        raise InputError(f"{args.image}: an archive cannot be fixed in place; use -o OUT.qcow2")
    if args.output:
        workdir = Path(args.output).absolute().parent
    elif is_ova:
        workdir = default_fix_output(args.image).absolute().parent
    else:
        workdir = None
    with engine_input(args.image, args.metadata, workdir) as (disk, meta, res):
        output = args.output
        if res.extracted:  # (--in-place on an OVA was refused above, before unpacking)
            output = output or str(default_fix_output(args.image))  # the unpacked disk is temporary
        return _fix(args, disk, meta, res, output)


def _fix(args: argparse.Namespace, disk: str, meta: dict | None, res: Any, output: str | None) -> int:
    from h2k.fix import fix_image
    from h2k.inputs.cli_support import write_profiles

    try:
        report = fix_image(
            disk, _planner(args), output=output, in_place=args.in_place, ems=args.ems,
            metadata=meta,
        )
    except NotWindows as exc:
        fn = _linux("fix_image", exc)
        result = fn(disk, output=output, in_place=args.in_place)
        show(result, args.json)
        if res.machine is not None:  # metadata came with the input: keep firmware, MACs, CPUs, memory
            prof = write_profiles(result.output, res.machine, meta, {}, "linux", args.bus)
            print(f"h2k: machine profiles (bootstrap, final) in {prof}", file=sys.stderr)
        return 0
    show(report, args.json)
    if res.machine is not None:
        prof = write_profiles(report.output, res.machine, meta, report.facts, "windows", args.bus)
        print(f"h2k: machine profiles (bootstrap, final) in {prof}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from h2k.inputs.cli_support import engine_input

    with engine_input(args.image, args.metadata) as (disk, meta, _res):
        return _verify(args, disk, meta)


def _verify(args: argparse.Namespace, disk: str, meta: dict | None) -> int:
    from h2k.verify import verify_image

    try:
        report = verify_image(disk, args.bus, meta)
    except NotWindows as exc:
        result = _linux("verify_image", exc)(disk, args.bus)
        show(result, args.json)
        require_ready(args.image, args.bus, result)
        return 0
    show(report, args.json)
    require_ready(args.image, args.bus, report)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from h2k.image import open_image
    from h2k.rollback import rollback_image

    image = open_image(args.image)  # the front door, once for both pipelines
    try:
        report = rollback_image(image, force=args.force)
    except NotWindows as exc:  # no NTFS at all: the Linux pipeline's journal, if any
        result = _linux("rollback_image", exc, any_os=True)(image, force=args.force)
        show(result, args.json)
        return 0
    show(report, args.json)
    return 0


BUS_HELP = "target disk bus: virtio-blk (viostor), virtio-scsi (vioscsi), or virtio-blk+virtio-scsi"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="inspect a disk (one read-only libguestfs launch)",
        description="Print what the engine sees in a disk image: product, build, arch, control set, firmware, "
        "BCD location, storage/network drivers, other hypervisors' tools, static IPs and blockers. "
        "Exits 4 when a blocker (hibernation, Fast Startup, BitLocker, dynamic disk) is found, 3 on bad input.",
    )
    p.add_argument("image", help="disk image (qcow2, raw, vmdk, vhd, vhdx ...) or VM (.vmx, .ovf, .ova, Hyper-V .xml); opened read-only")
    p.add_argument("--metadata", help="source metadata (.vmx, .ovf, .ova, Hyper-V .xml, or JSON like {\"firmware\": \"uefi\"}); wins over guessing")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "fix", help="make a Windows disk boot on VirtIO (offline, on an overlay by default)",
        description="Inspect, plan and apply in ONE libguestfs launch: copy the storage driver, write its "
        "service as boot-start, bind the VirtIO PCI IDs in the live control set, stage the driver packages, "
        "CrashControl\\AutoReboot=0, check the BCD (and enable EMS with --ems). By default the source is "
        "untouched and the result is a qcow2 overlay IMAGE.h2k.qcow2; -o makes a standalone copy. Every hive "
        "and the BCD are backed up in the guest and every change is journalled (h2k rollback undoes it). "
        "A second run reports 'nothing to do'.",
    )
    p.add_argument("image", help="disk image, or a VM (.vmx, .ovf, .ova, Hyper-V .xml): an OVA goes to -o (default VM.h2k.qcow2) "
                   "plus OUT.machine.json, the bootstrap and final profiles keeping firmware, MACs, CPUs and memory")
    p.add_argument("--drivers", help="virtio-win directory, ISO, or JSON/YAML manifest (required for Windows; "
                   "a Linux guest uses its own kernel's VirtIO modules)")
    p.add_argument("--bus", required=True, help=BUS_HELP)
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="write a standalone copy here (qcow2, or raw for .raw/.img)")
    out.add_argument("--in-place", action="store_true", help="write the image itself (no overlay, no copy)")
    p.add_argument("--ems", action="store_true", help="enable the EMS serial console on COM1 at 115200 in the BCD")
    p.add_argument("--metadata", help="source metadata (.vmx, .ovf, .ova, Hyper-V .xml or JSON); firmware from it wins")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_fix)

    p = sub.add_parser(
        "verify", help="static boot-readiness rules for a VirtIO bus (PASS/FAIL each)",
        description="Check, in one read-only launch, that the disk can boot on the given VirtIO bus: the "
        "driver's .sys is present, its service is boot-start (Type=1, Start=0, ErrorControl, ImagePath) in the "
        "LIVE control set, no StartOverride, the VirtIO PCI IDs are bound with the SCSIAdapter class "
        "(CriticalDeviceDatabase / DriverDatabase), and the BCD's default loader is consistent. "
        "Exits 1 if any rule FAILs.",
    )
    p.add_argument("image")
    p.add_argument("--bus", required=True, help=BUS_HELP)
    p.add_argument("--metadata", help="source metadata (.vmx or JSON)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "rollback", help="undo h2k fix runs on a disk from the journals inside it",
        description="Restore every hive and BCD the fixes changed from their in-guest backups (checked "
        "byte-identical by SHA-256), remove or restore the files written, and remove backups and journals. "
        "The image is changed in place. A fix or a rollback that was interrupted (Ctrl-C, a crash) is finished "
        "by running rollback again. Exits 4, changing nothing, when a hive or file changed since the fix "
        "(Windows booted and wrote to it), naming what changed; 3 when there is nothing to roll back (the "
        "image is then opened read-only).",
    )
    p.add_argument("image", help="a disk written by h2k fix (the overlay, the copy, or an --in-place image)")
    p.add_argument("--force", action="store_true",
                   help="restore the state before the fix even where the guest changed since (those changes are lost)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rollback)
