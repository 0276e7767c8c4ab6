"""``h2k accel``: show (and optionally re-probe) the KVM/TCG decision."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from h2k import accel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "accel",
        help="show whether QEMU and libguestfs will use KVM or TCG, and why",
        description=(
            "Decide between KVM and TCG by booting a tiny probe guest under KVM with a deadline "
            "(cached per host). H2K_ACCEL=kvm|tcg overrides the decision."
        ),
    )
    p.add_argument("--refresh", action="store_true", help="ignore the cached decision and probe again")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    decision = accel.decide(refresh=args.refresh, announce=not args.json)
    if args.json:
        print(json.dumps(asdict(decision)))
    return 0
