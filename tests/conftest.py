"""Shared test set-up: one accelerator decision, libguestfs environment, markers."""

from __future__ import annotations

import os

import pytest

from h2k import accel


def pytest_configure(config: pytest.Config) -> None:
    # Decide KVM/TCG once (cached per host) and point libguestfs at it before any test launches.
    os.environ.setdefault("H2K_QUIET", "0")
    accel.apply_libguestfs_env()


@pytest.fixture(scope="session")
def accel_decision() -> accel.AccelDecision:
    return accel.decide(announce=False)
