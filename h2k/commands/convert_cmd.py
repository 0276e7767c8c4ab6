"""``h2k convert INPUT -o OUT.qcow2``: any supported input to a standalone qcow2 (or raw) disk."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from h2k.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a VMware/Hyper-V/cloud/raw input to a standalone qcow2 (or raw) disk",
        description=(
            "Convert INPUT -- a disk (VMDK in any subformat, VHD fixed/dynamic, VHDX, qcow2, raw), a VMware "
            ".vmx, an .ovf or .ova, a Hyper-V configuration .xml, or a JSON sidecar -- into OUT. The input is "
            "never written. Before starting, the snapshot chain (if any) is shown and the free space on OUT's "
            "file system is checked; the output is written to a temporary file and renamed only when complete, "
            "and its SHA-256 is printed. A snapshot chain is refused unless --flatten is given. With several "
            "disks, the first (boot) disk goes to OUT and disk N to OUT-diskN.EXT. OUT.qcow2 is qcow2, "
            ".raw/.img is raw (sparse)."
        ),
    )
    p.add_argument("input", help="disk image or VM metadata (.vmx, .ovf, .ova, Hyper-V .xml, .json)")
    p.add_argument("-o", "--output", required=True, help="output disk (.qcow2, or .raw/.img for raw)")
    p.add_argument("-O", "--format", choices=("qcow2", "raw"), help="output format (default: from OUT's suffix, else qcow2)")
    p.add_argument("--flatten", action="store_true", help="merge a snapshot chain (qcow2 backing files, VMDK parents) into one disk")
    p.add_argument("--no-checksum", action="store_true", help="skip the SHA-256 of the result (it reads the output once more)")
    p.add_argument("--json", action="store_true", help="print the result (outputs, checksums, source machine) as JSON")
    p.set_defaults(func=run)


def outputs_for(output: Path, count: int) -> list[Path]:
    return [output] + [output.with_name(f"{output.stem}-disk{i + 1}{output.suffix}") for i in range(1, count)]


def run(args: argparse.Namespace) -> int:
    from h2k.inputs.convert import convert_disk
    from h2k.inputs.source import resolve_input
    from h2k.progress import Progress

    output = Path(args.output).absolute()
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")
    # An OVA is unpacked next to the output (same file system the space check looks at).
    with tempfile.TemporaryDirectory(prefix=".h2k-input-", dir=output.parent) as work, \
            resolve_input(args.input, work) as res:
        outs = outputs_for(output, len(res.disks))
        for o in outs:
            if o.exists():
                raise InputError(f"{o}: already exists; remove it or choose another output")
        results = []
        written: list[Path] = []
        try:
            for chain, out in zip(res.images, outs):  # each disk as the front door opened it
                if chain.is_chain:
                    print(f"h2k: snapshot chain of {len(chain.layers)} layers:\n{chain.describe()}", file=sys.stderr)
                with Progress(f"convert {Path(chain.given).name}", 10) as prog:
                    results.append(convert_disk(chain, out, fmt=args.format, flatten=args.flatten, progress=prog,
                                                checksum=not args.no_checksum))
                written.append(out)
        except BaseException:
            for o in written:  # several disks: all or nothing
                o.unlink(missing_ok=True)
            raise
    if args.json:
        json.dump({"outputs": [r.to_dict() for r in results],
                   "machine": res.machine.to_dict() if res.machine else None}, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for r in results:
            print(f"{r.output}: {r.format}, {r.virtual_size / 2**30:.2f} GiB virtual, "
                  f"{r.bytes_on_disk / 2**20:.1f} MiB on disk, sha256 {r.sha256 or 'skipped'} ({r.seconds:.1f}s)")
        if res.machine:
            m = res.machine
            nics = ", ".join(f"{n.model or '?'} {n.mac or '-'}" for n in m.nics) or "none"
            sb = " + Secure Boot" if m.secure_boot else ""
            print(f"source machine ({m.origin}): firmware {m.firmware or 'from disk'}{sb}, "
                  f"{m.cpus or '?'} CPU, {m.memory_mib or '?'} MiB, NICs {nics}")
    return 0
