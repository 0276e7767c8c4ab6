"""The driver-pack gate: compare a candidate run with a baseline run, cell by cell.

A regression is a cell that was good in the baseline (passed or softfailed) and
is bad in the candidate (failed, timeout, incomplete, skipped) or missing from
it. A cell whose proof mode differs between the runs (a static verify against a
real boot) is ``incomparable``: its verdicts say different things, so it fails the
gate apart from the regressions. Anything else is reported but does not fail the gate.

``check_driver_versions`` proves that the candidate pack is the one running:
the lab records the guest agent's ``guest-get-devices`` answer, which names the
driver version bound to each PCI device; every VirtIO device (vendor 0x1AF4) in
every good Windows boot cell must run the required version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matrix.model import GOOD_VERDICTS, CellResult, RunResults

VIRTIO_VENDOR = 0x1AF4


@dataclass(frozen=True)
class Change:
    id: str
    baseline: str | None  # verdict, None = not in the baseline
    candidate: str | None  # verdict, None = missing from the candidate
    kind: str  # regression | incomparable | fixed | new | dropped | changed | same
    detail: str = ""

    @property
    def regression(self) -> bool:
        return self.kind == "regression"


# The order a reader needs: what fails the gate first, then what changed for the better, ...
KIND_ORDER = ("regression", "incomparable", "fixed", "new", "dropped", "changed", "same")


def _kind(base: str | None, cand: str | None) -> str:
    if base is None:
        return "new"
    if cand is None:
        return "regression" if base in GOOD_VERDICTS else "dropped"
    if base == cand:
        return "same"
    if base in GOOD_VERDICTS and cand not in GOOD_VERDICTS:
        return "regression"
    if base not in GOOD_VERDICTS and cand in GOOD_VERDICTS:
        return "fixed"
    return "changed"


def compare(baseline: RunResults, candidate: RunResults) -> list[Change]:
    base = baseline.by_id()
    cand = candidate.by_id()
    ids = list(base) + [i for i in cand if i not in base]
    out = []
    for cid in ids:
        b, c = base.get(cid), cand.get(cid)
        kind = _kind(b.verdict if b else None, c.verdict if c else None)
        detail = ""
        if c is None:
            detail = "missing from the candidate"
        elif c.verdict not in GOOD_VERDICTS:
            detail = (f"0x{c.stop_code:X} {c.stop_name or ''} ".lstrip() if c.stop_code is not None else "") + c.reason
        if b is not None and c is not None and b.proof != c.proof:
            kind = "incomparable"  # never weigh a static verify against a real boot
            detail = f"proof mode differs: baseline {b.proof}, candidate {c.proof}"
        out.append(Change(cid, b.verdict if b else None, c.verdict if c else None, kind, detail.strip()))
    return out


def ordered(changes: list[Change]) -> list[Change]:
    """Regressions first, then incomparable cells, fixed, new, dropped, changed, same (stable within a kind)."""
    return sorted(changes, key=lambda ch: KIND_ORDER.index(ch.kind))


def table(changes: list[Change], *, all_cells: bool = False) -> str:
    rows = [ch for ch in ordered(changes) if all_cells or ch.kind != "same"]
    if not rows:
        return "no changes"
    w = max(len("cell"), *(len(ch.id) for ch in rows))
    lines = [f"{'cell':<{w}}  {'baseline':<10}  {'candidate':<10}  {'change':<12}  detail"]
    for ch in rows:
        lines.append(
            f"{ch.id:<{w}}  {ch.baseline or '-':<10}  {ch.candidate or '-':<10}  {ch.kind:<12}  {ch.detail}".rstrip()
        )
    return "\n".join(lines)


def _int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except (TypeError, ValueError):
        try:
            return int(str(value), 16)
        except (TypeError, ValueError):
            return None


def virtio_devices(agent: dict[str, Any]) -> list[dict[str, Any]]:
    """The VirtIO PCI devices in a guest-get-devices answer (as recorded by the lab)."""
    devices = agent.get("devices") or agent.get("guest-get-devices") or []
    out = []
    for dev in devices if isinstance(devices, list) else []:
        ident = dev.get("id") or {}
        vendor = _int(ident.get("vendor-id", ident.get("vendor_id")))
        if vendor == VIRTIO_VENDOR:
            out.append(dev)
    return out


def check_driver_versions(candidate: RunResults, version: str) -> list[str]:
    """Problems (empty = proven): good Windows boot cells whose VirtIO devices run another version."""
    problems = []
    checked = 0
    for r in candidate.cells:
        if r.cell.kind != "windows" or r.cell.mode != "boot" or r.verdict not in GOOD_VERDICTS:
            continue
        devs = virtio_devices(r.agent or {})
        if not devs:
            problems.append(f"{r.id}: no guest-get-devices data for VirtIO devices")
            continue
        checked += 1
        for dev in devs:
            have = str(dev.get("driver-version", dev.get("driver_version", "")))
            if have != version:
                name = dev.get("driver-name", dev.get("driver_name", "?"))
                dev_id = _int((dev.get("id") or {}).get("device-id"))
                problems.append(
                    f"{r.id}: {name} (1AF4:{dev_id or 0:04X}) runs driver {have or 'unknown'}, not {version}"
                )
    if checked == 0 and not problems:
        problems.append("no passed Windows boot cell in the candidate results to prove the driver version")
    return problems


def regressions(changes: list[Change]) -> list[Change]:
    return [ch for ch in changes if ch.regression]


def incomparable(changes: list[Change]) -> list[Change]:
    return [ch for ch in changes if ch.kind == "incomparable"]


def describe(results: RunResults) -> str:
    c = results.counts()
    return ", ".join(f"{n} {v}" for v, n in c.items() if n) or "no cells"


def cell_result(results: RunResults, cid: str) -> CellResult | None:
    return results.by_id().get(cid)
