"""``h2k plan``: show every file and registry change a fix would make, without touching a disk.

Input is either a facts JSON file (the output of ``h2k inspect --json``) or a
disk image, which is inspected first (one read-only libguestfs launch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from h2k.errors import InputError
from h2k.facts import WindowsFacts


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="list the changes that would make a Windows disk boot on VirtIO (no disk is changed)",
        description=(
            "Choose the VirtIO drivers for the guest's Windows build and architecture (Windows 11 and "
            "Server releases by build number) from a virtio-win directory, ISO or manifest, and list every "
            "file copy and registry value the fix would write, each with the reason. INPUT is a facts JSON "
            "file from 'h2k inspect --json' or a disk image (inspected read-only first). Unknown builds and "
            "packs without a matching driver are errors (exit 3)."
        ),
    )
    p.add_argument("input", metavar="FACTS.json|IMAGE", help="facts JSON from 'h2k inspect --json', or a disk image")
    p.add_argument("--drivers", required=True, metavar="PACK",
                   help="virtio-win directory, virtio-win ISO, or a JSON/YAML manifest overriding the layout")
    p.add_argument("--bus", required=True, choices=["virtio-blk", "virtio-scsi", "both"],
                   help="target disk bus: viostor for virtio-blk, vioscsi for virtio-scsi, or both drivers")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.add_argument("--binding", default="auto", choices=["auto", "cdd", "driverdb", "both"],
                   help="how to bind the PCI IDs: auto decides by the presence of SYSTEM\\DriverDatabase")
    p.add_argument("--no-firstboot", action="store_true",
                   help="only the boot-critical changes: no staged packages, no first-boot script")
    p.add_argument("--no-guest-agent", action="store_true", help="do not stage or install qemu-ga")
    p.add_argument("--no-static-ip", action="store_true",
                   help="do not re-apply the old NIC's static IP to the VirtIO NIC")
    p.add_argument("--no-bootstrap-drivers", action="store_true",
                   help="leave the in-box AHCI/IDE drivers (storahci, msahci, intelide, pciide, atapi) as they are "
                        "instead of making them boot-start for the SATA/IDE bootstrap boot")
    p.add_argument("--os-folder", metavar="FOLDER",
                   help="use this virtio-win OS folder instead of the one chosen from the build (e.g. w11)")
    p.set_defaults(func=run)


def load_facts(path: str) -> WindowsFacts:
    """Facts from a JSON file, or by inspecting an image."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file")
    if p.suffix.lower() in (".vmx", ".ovf", ".ova", ".xml", ".vmcx"):  # a VM: its disk, with its metadata
        from h2k.inputs.cli_support import engine_input
        from h2k.inspect import inspect_image

        with engine_input(str(p)) as (disk, meta, _res):
            return inspect_image(disk, meta)
    if p.suffix.lower() == ".json" or _starts_with_brace(p):
        try:
            data = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and "facts" in data and isinstance(data["facts"], dict):
            data = data["facts"]
        try:
            return WindowsFacts.from_dict(data)
        except TypeError as exc:
            raise InputError(f"{path}: not a Windows facts file ({exc})") from None
    try:
        from h2k.inspect import inspect_image
    except ImportError:
        raise InputError(f"{path}: not a .json facts file, and image inspection is unavailable") from None
    from h2k.inputs.cli_support import engine_input

    with engine_input(str(p)) as (disk, meta, _res):  # any disk format; a JSON sidecar beside it counts
        return inspect_image(disk, meta)


def _starts_with_brace(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False


def run(args: argparse.Namespace) -> int:
    from h2k.driverpack import open_pack
    from h2k.plan import PlanOptions, build_plan, format_table, plan_to_dict

    facts = load_facts(args.input)
    pack = open_pack(args.drivers)
    options = PlanOptions(
        firstboot=not args.no_firstboot,
        guest_agent=not args.no_guest_agent,
        reapply_static_ip=not args.no_static_ip,
        binding=args.binding,
        bootstrap_drivers=not args.no_bootstrap_drivers,
        os_folder=args.os_folder,
    )
    plan = build_plan(facts, pack, args.bus, options)
    if args.json:
        json.dump(plan_to_dict(plan), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(plan))
    return 0
