"""The h2k command table: each module registers exactly the subcommands the table says, and
running one command imports only its own module."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from h2k.cli import COMMAND_MODULES, build_parser, modules_for


@pytest.mark.parametrize("module", sorted(COMMAND_MODULES))
def test_table_matches_what_each_module_registers(module):
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(sub)
    assert sorted(sub.choices) == sorted(COMMAND_MODULES[module])


def test_one_command_needs_one_module_and_help_needs_all():
    assert modules_for(["-v", "fix", "disk.qcow2", "--bus", "virtio-blk"]) == ["h2k.commands.engine_cmd"]
    assert modules_for(["convert", "a.vmdk", "-o", "b.qcow2"]) == ["h2k.commands.convert_cmd"]
    assert modules_for(["--help"]) == list(COMMAND_MODULES)
    assert modules_for(["no-such-command"]) == list(COMMAND_MODULES)
    assert set(build_parser([]).parse_args(["accel"]).__dict__) >= {"command", "func"}


def test_running_convert_does_not_import_the_matrix_runner():
    code = ("import sys; from h2k.cli import main\n"
            "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('matrix.cli' in sys.modules, 'h2k.inspect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]
