"""``h2k linux inspect|fix|verify|rollback``: the Linux pipeline, callable directly.

``h2k inspect|fix|verify`` hand non-Windows disks to the same functions
(``h2k.linux``); this command skips the Windows probe and needs no driver pack.
Exit codes: 0 ok, 1 verify failed, 2 engine error, 3 bad input, 4 rollback refused (changed since the fix).
"""

from __future__ import annotations

import argparse

from h2k.commands.report_out import require_ready, show


def cmd_inspect(args: argparse.Namespace) -> int:
    from h2k.linux import inspect_image

    show(inspect_image(args.image), args.json)
    return 0


def cmd_fix(args: argparse.Namespace) -> int:
    from h2k.linux import fix_image

    show(fix_image(args.image, output=args.output, in_place=args.in_place), args.json)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from h2k.linux import verify_image

    report = verify_image(args.image, args.bus)
    show(report, args.json)
    require_ready(args.image, args.bus, report)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from h2k.linux import rollback_image

    show(rollback_image(args.image, force=args.force), args.json)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "linux",
        help="the Linux pipeline: inspect, fix, verify, rollback a Linux disk",
        description="Make a Linux disk from VMware boot on VirtIO: VirtIO drivers in every kernel's initramfs "
        "(regenerated with the guest's own tool), fstab/crypttab and GRUB root= by UUID, VMware tools and "
        "MAC-pinned network config removed. Each action is one libguestfs launch.",
    )
    lsub = p.add_subparsers(dest="linux_command", metavar="ACTION")
    lsub.required = True

    sp = lsub.add_parser("inspect", help="what the engine sees (read-only)")
    sp.add_argument("image", help="disk image (qcow2, raw, vmdk ...)")
    sp.add_argument("--json", action="store_true", help="print the facts as JSON")
    sp.set_defaults(func=cmd_inspect)

    sp = lsub.add_parser(
        "fix", help="fix on an overlay (default), an output copy, or in place",
        description="Without -o or --in-place the result is a qcow2 overlay IMAGE.h2k.qcow2 over the untouched "
        "source. Every changed file is backed up in the guest under /var/lib/hyper2kvm/backup/<run>/ and "
        "listed in a JSON journal (in the guest and next to the output). A second run reports nothing to do.",
    )
    sp.add_argument("image", help="disk image to fix")
    sp.add_argument("-o", "--output", help="write a standalone copy here instead of an overlay")
    sp.add_argument("--in-place", action="store_true", help="change IMAGE itself (the journal still allows rollback)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(func=cmd_fix)

    sp = lsub.add_parser("verify", help="static boot-readiness rules (read-only); exit 1 on a FAIL")
    sp.add_argument("image", help="disk image to check")
    sp.add_argument("--bus", default="virtio-blk", choices=["virtio-blk", "virtio-scsi", "virtio-blk+virtio-scsi"],
                    help="target disk bus (default virtio-blk)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(func=cmd_verify)

    sp = lsub.add_parser("rollback", help="undo the last fix on IMAGE (the overlay/output fix made) from its journal",
                         description="Restore the files the last fix changed and reinstate removed packages. An "
                         "interrupted fix or rollback is finished by running rollback again. Exits 4, changing "
                         "nothing, when a file the fix wrote changed since; 3 when there is nothing to roll back.")
    sp.add_argument("image", help="the fixed disk")
    sp.add_argument("--force", action="store_true",
                    help="restore the files even where they changed since the fix (those changes are lost)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(func=cmd_rollback)
