"""``h2k testbed list|build``: build test-bed artefacts (cached by recipe hash).

Each builder module exposes ``builders() -> dict[str, Callable[[], Path]]``;
a builder returns the cached artefact's path, building it first if needed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from h2k.errors import InputError

BUILDER_MODULES = [
    "lab.testbed.windisk",
    "lab.testbed.virtio_win",
    "lab.testbed.linux_guest",
]


def all_builders() -> dict[str, Callable[[], Path]]:
    found: dict[str, Callable[[], Path]] = {}
    for name in BUILDER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found.update(module.builders())
    return found


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "testbed",
        help="build the test bed: phony Windows disks, a fake virtio-win pack, small Linux guests",
        description="Build test-bed artefacts. Each is cached by a hash of its recipe and builder code.",
    )
    tsub = p.add_subparsers(dest="testbed_command", metavar="ACTION")
    tsub.required = True
    lp = tsub.add_parser("list", help="list the artefacts that can be built")
    lp.set_defaults(func=run_list)
    bp = tsub.add_parser("build", help="build artefacts (or reuse cached ones) and print their paths")
    bp.add_argument("names", nargs="+", metavar="NAME", help="artefact names from 'h2k testbed list', or 'all'")
    bp.set_defaults(func=run_build)


def run_list(args: argparse.Namespace) -> int:
    for name in sorted(all_builders()):
        print(name)
    return 0


def run_build(args: argparse.Namespace) -> int:
    builders = all_builders()
    names = sorted(builders) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise InputError(f"unknown test-bed artefact(s): {', '.join(unknown)} (see 'h2k testbed list')")
    for name in names:
        path = builders[name]()
        print(f"{name}\t{path}")
        sys.stdout.flush()
    return 0
