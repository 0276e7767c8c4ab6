"""Shared test set-up: one accelerator decision, libguestfs environment, markers, no silent skips in CI."""

from __future__ import annotations

import os

import pytest

from skip_policy import SkipPolicy, enforced

from h2k import accel


def pytest_configure(config: pytest.Config) -> None:
    # Decide KVM/TCG once (cached per host) and point libguestfs at it before any test launches.
    os.environ.setdefault("H2K_QUIET", "0")
    accel.apply_libguestfs_env()
    # Under CI=true a skip fails the run (tests/skip_policy.py: the why, and the short allow-list).
    config.pluginmanager.register(SkipPolicy(enforced()), "h2k-skip-policy")


@pytest.fixture(scope="session")
def accel_decision() -> accel.AccelDecision:
    return accel.decide(announce=False)


# The longest xdist groups (each firmware's Linux fix and boots: ~15 min under TCG) go first.
# With --no-loadscope-reorder (the Makefile passes it) xdist hands out groups in this order, one
# to each worker to begin with, so the two start at once on different workers; by default it
# orders groups by test count, which could give both to one worker, late.
LONG_GROUPS = ("linux-bios", "linux-uefi")


def _group(item: pytest.Item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return None
    return mark.args[0] if mark.args else mark.kwargs.get("name")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        group = _group(item)
        return LONG_GROUPS.index(group) if group in LONG_GROUPS else len(LONG_GROUPS)

    items.sort(key=rank)  # stable: the order within and outside the groups is kept


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium (tests/browser.py); missing, it fails the test: it is in apt-packages.txt."""
    from browser import Chromium, find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.fail("chromium is not installed: packaging/apt-packages.txt lists it and `make test` installs it")
    return Chromium(exe)
