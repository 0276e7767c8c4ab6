"""No silent skips: under CI=true a skip fails the run unless it is allowed with a reason.

Inner pytest sessions (pytester) run small test files with the policy plugin of
tests/skip_policy.py: in process for each kind of skip, and once in a subprocess with
two xdist workers, as `make test` runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from skip_policy import ALLOWED, SkipPolicy, enforced

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
IN_REPO = ("h2k", "lab", "matrix")

TESTS = """
import pytest

def test_plain():
    pass

def test_skip_call():
    pytest.skip("no tool here")

@pytest.mark.skipif(True, reason="needs root")
def test_skipif():
    pass

@pytest.fixture
def needs_thing():
    pytest.skip("fixture cannot find the thing")

def test_fixture_skip(needs_thing):
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    pytest.skip(f"param {n}")

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail():
    assert False
"""


# Inner sessions need none of the suite's heavier plugins.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:hyper2kvm-matrix")


def run(pytester: pytest.Pytester, enforce: bool, allowed: dict[str, str] | None = None):
    return pytester.runpytest_inprocess(*QUIET, plugins=[SkipPolicy(enforce, allowed or {})])


def test_every_kind_of_skip_fails_under_ci(pytester):
    pytester.makepyfile(test_a=TESTS)
    res = run(pytester, True)
    # a skip in the test's call fails it; one in its set-up (skipif, a fixture) is a set-up error
    res.assert_outcomes(passed=1, failed=3, errors=2, xfailed=1)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    out = res.stdout.str()
    for reason in ("no tool here", "needs root", "fixture cannot find the thing", "param 1", "param 2"):
        assert f"skipped under CI=true: {reason}" in out
    assert "ALLOWED in tests/skip_policy.py" in out


def test_without_ci_a_skip_is_a_skip(pytester):
    pytester.makepyfile(test_a=TESTS)
    res = run(pytester, False)
    res.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert res.ret == pytest.ExitCode.OK


def test_allowed_skips_with_their_reason(pytester):
    pytester.makepyfile(test_a=TESTS)
    allowed = {"test_a.py::test_param": "reviewed: every parametrized case",
               "test_a.py::test_skip": "a prefix of a test's name is not that test",
               "test_a.py::test_skipif": "reviewed: needs what CI cannot give"}
    res = run(pytester, True, allowed)
    res.assert_outcomes(passed=1, skipped=3, failed=1, errors=1, xfailed=1)
    assert "test_skip_call skipped under CI=true" in res.stdout.str()


def test_a_module_skipped_at_collection_fails_the_session(pytester):
    pytester.makepyfile(test_mod="""
        import pytest
        nothing = pytest.importorskip("no_such_module_h2k")

        def test_x():
            pass
        """, test_ok="def test_ok():\n    pass\n")
    res = run(pytester, True)
    res.assert_outcomes(passed=1, skipped=1)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    out = res.stdout.str()
    assert "modules skipped under CI=true (the run fails)" in out
    assert "test_mod.py skipped under CI=true: could not import 'no_such_module_h2k'" in out
    assert run(pytester, True, {"test_mod.py": "reviewed: an optional module"}).ret == pytest.ExitCode.OK


def test_with_xdist_workers_as_make_test_runs(pytester, monkeypatch):
    """The conftest registers the policy in every worker; module skips reach the controller."""
    pytester.makeconftest(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from skip_policy import SkipPolicy, enforced

        def pytest_configure(config):
            config.pluginmanager.register(SkipPolicy(enforced()), "h2k-skip-policy")
        """)
    pytester.makepyfile(test_a=TESTS, test_mod="""
        import pytest
        pytest.importorskip("no_such_module_h2k")
        """)
    monkeypatch.setenv("CI", "true")
    res = pytester.runpytest_subprocess(*QUIET, "-n", "2")
    res.assert_outcomes(passed=1, failed=3, errors=2, skipped=1, xfailed=1)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    assert "test_mod.py skipped under CI=true" in res.stdout.str()


def test_ci_is_read_from_the_environment():
    assert enforced({"CI": "true"}) and enforced({"CI": "TRUE"}) and enforced({"CI": "1"})
    assert not enforced({}) and not enforced({"CI": "false"}) and not enforced({"CI": ""})


def test_the_allow_list_is_short_and_says_why():
    assert len(ALLOWED) <= 5
    for nodeid, reason in ALLOWED.items():
        path = ROOT / nodeid.split("::")[0]
        assert path.is_file(), nodeid
        assert len(reason.split()) >= 4, f"{nodeid}: say why it may skip in CI"


def test_no_in_repo_module_is_imported_with_importorskip():
    """In-repo modules are imported: a broken one must fail, not skip its whole file."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        text = path.read_text()
        if "importorskip" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and re.split(r"\.", str(node.args[0].value))[0] in IN_REPO):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.args[0].value}")
    assert offenders == []
