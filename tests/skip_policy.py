"""No silent skips in CI: under ``CI=true`` a skipped test fails the run.

A skip drops a proof without a word: a missing tool (``virt-xml-validate``), a module
that does not import, a check that needs root. On a developer's machine that may be
fine; in CI it hides exactly what CI is for. So when the environment says ``CI=true``
(``.ci/run`` and the GitHub workflows set it; GitHub sets it for every job):

* a test skipped while it runs (``pytest.skip``, ``skipif``, a fixture that skips) is
  reported **failed**, with the skip's reason;
* a module skipped while it is collected (``importorskip``, ``allow_module_level``) fails
  the session (exit status 1) and is listed in the terminal summary;

unless its node ID is in ``ALLOWED`` below, with the reason it may skip in CI. Keep that
list short and reviewed: every entry is a proof CI does not give. ``xfail`` is not a skip
and is left alone.
"""

from __future__ import annotations

import os

import pytest

# node ID (a module, a test, or a test's parametrized ID) -> why it may skip even in CI.
ALLOWED: dict[str, str] = {}

ENV = "CI"


def enforced(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> bool:
    return environ.get(ENV, "").strip().lower() in ("true", "1", "yes")


def _reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


class SkipPolicy:
    """The pytest plugin (registered by tests/conftest.py)."""

    def __init__(self, enforce: bool, allowed: dict[str, str] | None = None) -> None:
        self.enforce = enforce
        self.allowed = ALLOWED if allowed is None else allowed
        self.collect_skips: list[tuple[str, str]] = []

    def is_allowed(self, nodeid: str) -> bool:
        # "tests/x.py" allows the module, "tests/x.py::test_f" every parametrized test_f[...]
        return any(nodeid == key or nodeid.startswith((key + "::", key + "[")) for key in self.allowed)

    def message(self, nodeid: str, reason: str) -> str:
        return (f"{nodeid} skipped under {ENV}=true: {reason}\n"
                "A skip in CI hides a proof: meet the requirement, or add the test to ALLOWED in "
                "tests/skip_policy.py with the reason it may skip.")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if (self.enforce and report.skipped and not hasattr(report, "wasxfail")
                and not self.is_allowed(report.nodeid)):
            report.outcome = "failed"
            report.longrepr = self.message(report.nodeid, _reason(report))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self.enforce and report.skipped and not self.is_allowed(report.nodeid):
            entry = (report.nodeid, _reason(report))
            if entry not in self.collect_skips:  # xdist forwards one per worker
                self.collect_skips.append(entry)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.collect_skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.collect_skips:
            return
        terminalreporter.section(f"modules skipped under {ENV}=true (the run fails)", red=True, bold=True)
        for nodeid, reason in self.collect_skips:
            terminalreporter.line(self.message(nodeid, reason))
