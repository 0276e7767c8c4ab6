"""``h2k testbed build``: which artefacts 'all' means, in what order, in parallel, and its errors.

The builders here are small fakes writing files (pure scheduling logic); the real builders
are exercised by every test that uses the test bed.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import pytest

from h2k.errors import InputError
from lab.testbed import cli


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    log = tmp_path / "order.log"
    mod = types.ModuleType("h2k_fake_builders")

    def builder(name, fail=False):
        def run() -> Path:
            with open(log, "a") as fh:
                fh.write(name + "\n")
            if fail:
                raise RuntimeError(f"{name} broke\nsecond line")
            out = tmp_path / name
            out.write_text(name)
            return out
        return run

    mod.builders = lambda: {n: builder(n, fail=(n == "bad")) for n in ("base", "disk-a", "disk-b", "fixed", "bad")}
    mod.BUILD_STAGES = {"base": 0, "fixed": 3}
    mod.DERIVED = ("fixed",)
    monkeypatch.setitem(sys.modules, "h2k_fake_builders", mod)
    monkeypatch.setattr(cli, "BUILDER_MODULES", ["h2k_fake_builders"])
    return log


def _args(*names, jobs=1):
    return argparse.Namespace(names=list(names), jobs=jobs)


def test_all_is_every_source_artefact_in_stage_order(fake_module, capsys):
    with pytest.raises(Exception):
        cli.run_build(_args("all"))  # "bad" fails in sequential mode: the error propagates
    assert fake_module.read_text().split() == ["base", "bad"]  # base (stage 0) first, then by name
    fake_module.unlink()
    assert cli.run_build(_args("disk-b", "base", "disk-a")) == 0
    assert fake_module.read_text().split() == ["base", "disk-a", "disk-b"]
    assert "fixed" not in capsys.readouterr().out


def test_parallel_build_reports_every_failure_and_exits_2(fake_module, capsys):
    rc = cli.run_build(_args("all", jobs=2))
    out, err = capsys.readouterr()
    assert rc == 2
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == ["base", "disk-a", "disk-b"]
    assert "testbed build bad failed: bad broke\nsecond line" in err  # the evidence is kept
    assert err.strip().splitlines()[-1] == "h2k: error: 1 test-bed build(s) failed: bad"
    assert sorted(fake_module.read_text().split()) == ["bad", "base", "disk-a", "disk-b"]


def test_bad_names_and_jobs(fake_module):
    with pytest.raises(InputError, match="unknown test-bed artefact"):
        cli.run_build(_args("nope"))
    with pytest.raises(InputError, match="--jobs"):
        cli.run_build(_args("base", jobs=0))
