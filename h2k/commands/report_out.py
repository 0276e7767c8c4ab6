"""How the engine commands print a report and turn a failed verification into an exit code.

Every report (Windows or Linux: facts, fix, verify, rollback) has ``to_dict()`` and
``summary()``; ``--json`` prints the first, otherwise the second.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from h2k.errors import CheckFailed


def show(report: Any, as_json: bool) -> None:
    if as_json:
        json.dump(report.to_dict(), sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        print(report.summary())


def require_ready(image: str, bus: str, report: Any) -> None:
    """CheckFailed (exit 1) naming the failed rules unless every rule passed."""
    if not report.passed:
        failed = [f"{r.rule}/{r.subject}" for r in report.results if not r.passed]
        raise CheckFailed(f"{image}: not boot-ready on {bus}: {', '.join(failed)} failed")
