"""The ``h2k`` command: argparse subcommands, each registered by its own module.

A command module exposes ``register(subparsers)`` which adds its parser and
sets ``func`` (taking the parsed args, returning an exit code). Modules are
imported lazily so ``h2k --help`` stays fast and a broken optional part
(e.g. libvirt bindings missing) cannot take down unrelated commands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import NoReturn

from h2k import __version__
from h2k.errors import H2KError, InputError

# Module -> the subcommands it registers. Order is the order shown in --help. Only the module
# of the command being run is imported (a conversion should not pay for importing the matrix
# runner); --help and unknown commands import them all.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "h2k.commands.accel_cmd": ("accel",),
    "h2k.commands.engine_cmd": ("inspect", "fix", "verify", "rollback"),
    "h2k.commands.convert_cmd": ("convert",),
    "h2k.commands.plan_cmd": ("plan",),
    "lab.testbed.cli": ("testbed",),
    "lab.commands_boot": ("boot",),
    "matrix.cli": ("matrix",),
    "h2k.commands.domain_cmd": ("domain",),
    "h2k.commands.linux_cmd": ("linux",),
    "matrix.demo": ("demo",),
}


def modules_for(argv: list[str]) -> list[str]:
    """The command modules needed to parse ``argv``: the one owning its subcommand, or all."""
    first = next((a for a in argv if not a.startswith("-")), None)
    for module, commands in COMMAND_MODULES.items():
        if first in commands:
            return [module]
    return list(COMMAND_MODULES)


class Parser(argparse.ArgumentParser):
    """argparse with h2k's error contract: a usage error is bad input (exit 3), one ``h2k: error:`` line.

    Subcommand parsers are made from the same class (argparse's default), so
    ``h2k fix --bus`` without a value and ``h2k matrix run -j x`` behave alike.
    """

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        where = self.prog.removeprefix("h2k").strip()
        self.exit(InputError.exit_code, f"h2k: error: {where + ': ' if where else ''}{message}\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="h2k",
        description=(
            "hyper2kvm: make VM disks from VMware, Hyper-V, clouds or raw dumps boot on "
            "KVM/QEMU with VirtIO storage and network, and prove it by booting them."
        ),
    )
    parser.add_argument("--version", action="version", version=f"hyper2kvm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES if argv is None else modules_for(argv):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # keep the rest of the tool usable
            logging.getLogger("h2k").debug("command module %s unavailable: %s", name, exc)
            continue
        module.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP), raised like Ctrl-C so every ``finally`` runs: temporary files and children go."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="h2k: %(name)s: %(message)s",
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        return int(args.func(args) or 0)
    except H2KError as exc:
        print(f"h2k: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        name = signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "SIGINT"
        print(f"h2k: interrupted ({name}); temporary files removed", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Terminated) else signal.SIGINT)
    except OSError as exc:  # a file the command was pointed at, or the host itself
        code = InputError.exit_code if isinstance(exc, BAD_PATH_ERRORS) else H2KError.exit_code
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"h2k: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return code
    except Exception as exc:  # a bug or a broken tool: still one line; -v shows where
        logging.getLogger("h2k").debug("internal error", exc_info=True)
        last = (str(exc).strip().splitlines() or [""])[-1]
        print(f"h2k: error: internal error: {type(exc).__name__}: {last} (run 'h2k -v ...' for the traceback)",
              file=sys.stderr)
        return H2KError.exit_code


# OSErrors that mean "the path you gave is wrong", not "the host failed".
BAD_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
