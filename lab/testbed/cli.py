"""``h2k testbed list|build``: build test-bed artefacts (cached by recipe hash).

Each builder module exposes ``builders() -> dict[str, Callable[[], Path]]``;
a builder returns the cached artefact's path, building it first if needed. A module may
also name, in ``BUILD_STAGES``, artefacts that need others first (a higher stage builds
later) and, in ``DERIVED``, artefacts that are h2k's own output (fixed disks): ``all``
leaves those to the tests that check them.

``--jobs N`` builds N artefacts at once, each in its own process: ``make test`` builds the
whole test bed this way before pytest starts, so no test worker sits waiting on another's
build lock.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from h2k.errors import InputError

BUILDER_MODULES = [
    "lab.testbed.windisk",
    "lab.testbed.virtio_win",
    "lab.testbed.linux_guest",
]


def _modules() -> list:
    out = []
    for name in BUILDER_MODULES:
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            continue
    return out


def all_builders() -> dict[str, Callable[[], Path]]:
    found: dict[str, Callable[[], Path]] = {}
    for module in _modules():
        found.update(module.builders())
    return found


def build_stage(name: str) -> int:
    for module in _modules():
        stage = getattr(module, "BUILD_STAGES", {}).get(name)
        if stage is not None:
            return stage
    return 1


def derived() -> set[str]:
    return {n for module in _modules() for n in getattr(module, "DERIVED", ())}


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
    bp.add_argument("names", nargs="+", metavar="NAME",
                    help="artefact names from 'h2k testbed list', or 'all' (every source artefact; "
                         "fixed disks are h2k's output and are left to the tests)")
    bp.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                    help="build N artefacts at once, each in its own process (default 1)")
    bp.set_defaults(func=run_build)


def run_list(args: argparse.Namespace) -> int:
    for name in sorted(all_builders()):
        print(name)
    return 0


def _build_one(name: str) -> str:
    return str(all_builders()[name]())


def run_build(args: argparse.Namespace) -> int:
    builders = all_builders()
    names = sorted(set(builders) - derived()) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise InputError(f"unknown test-bed artefact(s): {', '.join(unknown)} (see 'h2k testbed list')")
    if args.jobs < 1:
        raise InputError("--jobs must be at least 1")
    # Artefacts others need first, dependants last, so a free process rarely waits on a lock.
    names = sorted(names, key=lambda n: (build_stage(n), n))
    if args.jobs == 1:
        for name in names:
            print(f"{name}\t{builders[name]()}", flush=True)
        return 0
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_build_one, n): n for n in names}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                print(f"{name}\t{fut.result()}", flush=True)
            except Exception as exc:  # report every failed build, then fail
                failed.append(name)
                # The whole message: a build's failure carries its evidence (tool output, grub lines).
                print(f"h2k: testbed build {name} failed: {str(exc) or repr(exc)}", file=sys.stderr, flush=True)
    if failed:
        print(f"h2k: error: {len(failed)} test-bed build(s) failed: {', '.join(sorted(failed))}", file=sys.stderr)
        return 2
    return 0
