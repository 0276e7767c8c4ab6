"""What changed in a hive since an ``h2k fix``, beyond what the fix itself wrote.

Rollback restores a hive from its backup only if the hive is still exactly what
the fix left (SHA-256 equal to the journal's "after"). When it is not, Windows
(or someone) wrote to it after the fix, and a restore would silently throw that
away. This module names those changes, so the refusal can say which values:
the expected hive is the original (the backup) with the journal's per-value
records applied; every key or value of the current hive that differs from it
is a change made since.
"""

from __future__ import annotations

from pathlib import Path

from h2k import registry
from h2k.journal import RegChange

Snapshot = dict[str, dict[str, tuple[int, str]]]  # key (lower case) -> value name (lower case) -> (type, hex)


def expected_after(before: Snapshot, records: list[RegChange]) -> Snapshot:
    """``before`` with the fix's records applied, in order."""
    out = {k: dict(v) for k, v in before.items()}
    for rec in records:
        key = rec.key.lower()
        if rec.action == "delete-key":
            for k in [k for k in out if k == key or k.startswith(key + "\\")]:
                del out[k]
            continue
        for created in rec.created_keys:
            out.setdefault(created.lower(), {})
        values = out.setdefault(key, {})
        name = (rec.name or "").lower()
        if rec.new_type is None:
            values.pop(name, None)
        else:
            values[name] = (rec.new_type, rec.new_data or "")
    return out


def differences(expected: Snapshot, current: Snapshot) -> list[str]:
    """Keys and values that differ, as ``key\\value`` paths with what happened to them."""
    out = []
    for key in sorted(set(expected) | set(current)):
        if key not in current:
            out.append(f"{key} (key removed)")
        elif key not in expected:
            out.append(f"{key} (key added)")
        else:
            want, got = expected[key], current[key]
            for name in sorted(set(want) | set(got)):
                if want.get(name) != got.get(name):
                    what = "added" if name not in want else "removed" if name not in got else "changed"
                    out.append(f"{key}\\{name or '(default)'} ({what})")
    return out


def hive_drift(backup: str | Path, current: str | Path, records: list[RegChange]) -> list[str]:
    """Changes in ``current`` that neither the original ``backup`` nor the fix's ``records`` explain."""
    return differences(expected_after(registry.snapshot(backup), records), registry.snapshot(current))
