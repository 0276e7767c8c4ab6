"""``h2k domain``: write libvirt domain XML for a converted disk (bootstrap or final machine)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from h2k import domain, libvirt_xml
from h2k.commands.argtypes import positive_int
from h2k.errors import CheckFailed, InputError
from h2k.facts import WindowsFacts
from h2k.image import DiskImage, open_image
from h2k.profile import FIRMWARES, NIC_MODELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "domain",
        help="write libvirt domain XML (bootstrap or final machine) for a converted disk",
        description=(
            "Write libvirt domain XML for IMAGE. 'bootstrap' is the first boot on hardware the guest "
            "already drives (disk on SATA, or IDE on i440fx; the VirtIO driver ISO as a CD-ROM; an "
            "e1000e NIC); 'final' is the VirtIO machine (virtio-blk or virtio-scsi; virtio-net). The "
            "firmware is kept from the inspection (--facts) or given with --firmware; Windows 11 on "
            "UEFI gets Secure Boot and a TPM 2.0. Load the result with 'virsh define' or 'virsh create'."
        ),
    )
    p.add_argument("image", help="the converted disk (qcow2 or raw)")
    p.add_argument("--stage", choices=("bootstrap", "final"), default="final", help="which machine (default: final)")
    p.add_argument("--bus", help="disk bus: sata|ide (bootstrap, default sata) or virtio-blk|virtio-scsi (final, default virtio-blk)")
    p.add_argument("--nic", choices=NIC_MODELS, help="NIC model (default: e1000e at bootstrap, virtio-net final)")
    p.add_argument("--facts", metavar="JSON", help="inspection facts (WindowsFacts JSON, e.g. from 'h2k inspect --json') to take the firmware and OS from")
    p.add_argument("--os", choices=domain.OS_TYPES, help="guest OS, skipping inspection (with --firmware, default bios)")
    p.add_argument("--firmware", choices=FIRMWARES, help="firmware (overrides facts and metadata)")
    p.add_argument("--metadata", metavar="FILE", help="source VM metadata: JSON (firmware, macs, memory_mb, cpus), a VMware .vmx, an .ovf/.ova or a Hyper-V configuration .xml")
    p.add_argument("--name", help="domain name prefix (default: from the image file name)")
    p.add_argument("--mac", action="append", metavar="MAC",
                   help="MAC address to keep from the source VM; repeat for several NICs (one NIC each, in order); "
                        "replaces the MACs from --metadata")
    p.add_argument("--memory", type=positive_int, metavar="MIB", help="memory in MiB")
    p.add_argument("--cpus", type=positive_int, help="virtual CPUs")
    p.add_argument("--virtio-iso", metavar="ISO", help="VirtIO driver ISO to attach as a CD-ROM (bootstrap)")
    p.add_argument("--nvram", metavar="FILE", help="the VM's UEFI VARS file (made from the template if missing; keep it from bootstrap to final)")
    p.add_argument("--domain-type", choices=("kvm", "qemu"), help="override the KVM/TCG decision of 'h2k accel'")
    p.add_argument("--lab", action="store_true", help="lab machine: a reboot or crash stops the VM instead of restarting it")
    p.add_argument("--no-validate", action="store_true", help="do not check the XML with virt-xml-validate")
    p.add_argument("-o", "--output", metavar="FILE", help="write the XML here (default: stdout)")
    p.set_defaults(func=run)


def _source(args: argparse.Namespace, disk: DiskImage, metadata: dict | None) -> WindowsFacts | dict:
    """Facts from --facts, else --os/--firmware as given, else one read-only inspection of the image."""
    if args.facts:
        try:
            with open(args.facts) as fh:
                data = json.load(fh)
            facts = WindowsFacts.from_dict(data.get("facts", data) if isinstance(data, dict) else data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise InputError(f"cannot read facts from {args.facts}: {exc}") from None
        if args.firmware:
            facts.firmware = args.firmware
        return facts
    if args.os:
        return {**(metadata or {}), "os": args.os, "firmware": args.firmware or (metadata or {}).get("firmware") or "bios"}
    from h2k import accel, inspect  # one libguestfs launch

    accel.apply_libguestfs_env()
    try:
        facts = inspect.inspect_image(disk, metadata)
    except inspect.NotWindows as exc:
        raise InputError(f"{exc} -- for this guest pass --os {exc.os_type if exc.os_type in domain.OS_TYPES else 'linux'} and --firmware") from None
    if args.firmware:
        facts.firmware = args.firmware
    return facts


def run(args: argparse.Namespace) -> int:
    image = os.path.abspath(args.image)
    if not os.path.isfile(image):
        raise InputError(f"{args.image}: no such disk image")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise InputError(f"-o {args.output}: no such folder {os.path.dirname(os.path.abspath(args.output))}")
    name = args.name or domain._safe_name(os.path.splitext(os.path.basename(image))[0]) or "guest"
    # Cheap checks before any inspection (a libguestfs launch).
    buses = domain.BOOTSTRAP_BUSES if args.stage == "bootstrap" else domain.FINAL_BUSES
    if args.bus and args.bus not in buses:
        raise InputError(f"{args.stage} disk bus must be one of {', '.join(buses)}, not {args.bus!r}")
    if args.virtio_iso and args.stage != "bootstrap":
        raise InputError("--virtio-iso belongs to the bootstrap stage")
    from h2k.inputs.cli_support import metadata_dict, profiles_beside
    from h2k.inputs.source import input_kind

    if input_kind(image) in ("vmx", "ovf", "ova", "hyperv", "xml", "vmcx"):
        raise InputError(f"{args.image}: a VM, not a disk: 'h2k convert' (or 'h2k fix') it first, then "
                         f"'h2k domain DISK --metadata {args.image}'")
    # .vmx/.ovf/.ova/Hyper-V .xml/JSON, or the IMAGE.machine.json 'h2k fix' left: firmware, MACs, CPUs, memory
    disk = open_image(image)  # the front door: the format libvirt gets is h2k's, never a guess
    metadata = metadata_dict(args.metadata or profiles_beside(image))
    source = _source(args, disk, metadata)
    meta = metadata or {}
    common = dict(name=name, macs=args.mac or domain.macs_of(meta), memory_mb=args.memory or _int_or_none(meta.get("memory_mb")),
                  cpus=args.cpus or _int_or_none(meta.get("cpus")))
    if args.stage == "bootstrap":
        profile = domain.bootstrap_profile(source, bus=args.bus or "sata", nic=args.nic or "e1000e", virtio_iso=args.virtio_iso and os.path.abspath(args.virtio_iso), **common)
    else:
        profile = domain.final_profile(source, bus=args.bus or "virtio-blk", nic=args.nic or "virtio-net", **common)
    files = libvirt_xml.DomainFiles(
        disk=disk.path,
        disk_format=disk.format,
        nvram=args.nvram and os.path.abspath(args.nvram),
    )
    xml = libvirt_xml.domain_xml(profile, files, libvirt_xml.XmlOptions(domain_type=args.domain_type, lab=args.lab))
    if not args.no_validate:
        validate(xml)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(xml)
        print(f"h2k: wrote {args.stage} domain {profile.name} ({profile.firmware}, {profile.disk_bus}, {profile.nic_model}) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(xml)
    return 0


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"metadata value {value!r} is not an integer") from None


def validate(xml: str) -> None:
    """Check XML against libvirt's schema with virt-xml-validate; CheckFailed with its message."""
    tool = shutil.which("virt-xml-validate")
    if not tool:
        raise CheckFailed("virt-xml-validate not found (install libvirt-clients) or pass --no-validate")
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="h2k-domain-") as fh:
        fh.write(xml)
        fh.flush()
        r = subprocess.run([tool, fh.name, "domain"], capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise CheckFailed(f"libvirt rejects the generated XML: {msg[0] if msg else r.returncode}")
