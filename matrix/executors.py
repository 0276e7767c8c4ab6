"""The real cell executor: h2k fixes each image, the lab boots each cell.

Every heavy step (the fix, a static verify, a boot) runs in a child process
(``python -m matrix.executors REQUEST RESULT``) in its own session. That gives
the runner a clean way to stop a cell at once: SIGTERM to the child makes the
lab unwind (its ``finally`` blocks stop QEMU and remove temp dirs); after a grace
period the child's whole process group is killed, and QEMU, started with
PDEATHSIG by the lab, dies with it. It also keeps libguestfs and QEMU state of
one cell out of the others' way.

Cells:

* ``boot`` (Windows): the image is fixed once per pack (``h2k.plan`` for both
  VirtIO buses, ``h2k.fix`` in place on a qcow2 overlay of the source), then
  each cell boots its own overlay, two-phase (bootstrap on SATA/IDE + e1000e
  with the pack's ISO attached, then the cell's bus and NIC) or direct.
* ``boot`` (Linux): fixed once with ``h2k.linux``, then booted directly.
* ``fix+verify`` (the test bed's phony Windows disks, which cannot boot): fixed
  once per pack, then each cell runs ``h2k.verify`` for its bus on its overlay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from h2k.errors import H2KError, InputError
from matrix.model import Cell, ImageSpec, PackSpec
from matrix.runner import CellContext, CellOutcome, Interrupted, Prepared

# After SIGTERM, how long a child may take to clean up before its process group is killed.
TERM_GRACE = 20.0


class ChildFailed(H2KError):
    """A child step ended with an error it reported (the message is its one-line cause)."""


def run_child(op: str, payload: dict[str, Any], workdir: Path, stop: threading.Event,
              deadline: float | None = None) -> dict[str, Any]:
    """Run ``op`` in a child process and return its JSON result; stop it when ``stop`` is set."""
    workdir.mkdir(parents=True, exist_ok=True)
    req = workdir / f"{op}.request.json"
    res = workdir / f"{op}.result.json"
    log = workdir / f"{op}.log"
    res.unlink(missing_ok=True)
    req.write_text(json.dumps({"op": op, **payload}, indent=2))
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "matrix.executors", str(req), str(res)],
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, H2K_QUIET=os.environ.get("H2K_QUIET", "0"),
                                         H2K_MATRIX_PARENT=str(os.getpid())))
        stopped_at = None
        try:
            while True:
                try:
                    proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    pass
                over = deadline is not None and time.monotonic() > deadline
                if (stop.is_set() or over) and stopped_at is None:
                    stopped_at = time.monotonic()
                    _signal_group(proc.pid, signal.SIGTERM)
                elif stopped_at is not None and time.monotonic() - stopped_at > TERM_GRACE:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
        except BaseException:  # Ctrl-C in a caller's main thread (pytest): never leave the child running
            _stop_child(proc)
            raise
    if stopped_at is not None:
        _signal_group(proc.pid, signal.SIGKILL)  # anything the child left behind in its group
        raise Interrupted(f"{op} stopped (log: {log})")
    if not res.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise RuntimeError(f"{op} child exited {proc.returncode} without a result"
                           + (f": {tail[0]}" if tail else "") + f" (log: {log})")
    data = json.loads(res.read_text())
    if data.get("error"):
        kind = data.get("error_kind", "H2KError")
        if kind == "internal":
            raise RuntimeError(f"{op}: {data['error']} (log: {log})")
        raise ChildFailed(data["error"])
    return data


def _stop_child(proc: subprocess.Popen) -> None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=TERM_GRACE)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- resolving images and packs ---------------------------------------------------


def _artefact(recipe: str) -> Path:
    from lab.testbed.cli import all_builders

    builders = all_builders()
    if recipe not in builders:
        raise InputError(f"unknown test-bed recipe {recipe!r} (see 'h2k testbed list')")
    return Path(builders[recipe]())


def resolve_image(image: ImageSpec) -> Path:
    if image.path:
        p = Path(image.path)
        if not p.exists():
            raise InputError(f"image {image.name}: {p} does not exist")
        return p
    if image.recipe:
        return _artefact(image.recipe)
    raise InputError(f"image {image.name}: no path (set it in the matrix, its ${{VAR}}, or --image-path "
                     f"{image.name}=PATH)")


def resolve_pack(pack: PackSpec | None) -> Path | None:
    if pack is None:
        return None
    if pack.path:
        p = Path(pack.path)
        if not p.exists():
            raise InputError(f"driver pack {pack.name}: {p} does not exist")
        return p
    if pack.recipe:
        return _artefact(pack.recipe)
    raise InputError(f"driver pack {pack.name}: no path (use --pack-path {pack.name}=PATH)")


# --- the executor ------------------------------------------------------------------


class LabExecutor:
    """Fix with h2k, boot with the lab (or verify statically), each step in a child process."""

    def __init__(self, backend: str = "qemu", fix: bool = True) -> None:
        self.backend = backend
        self.fix = fix  # False: boot the images as they are (the "before" picture, or throughput runs)
        # Static verification is read-only and a fix+verify cell's overlay is the fixed disk
        # unchanged, so each fixed disk is verified once for both VirtIO buses (one libguestfs
        # launch) and every cell reports the rules of its own bus.
        self._verified: dict[str, dict[str, Any] | BaseException] = {}
        self._verify_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LabExecutor":
        return cls(backend=getattr(args, "backend", None) or "qemu", fix=not getattr(args, "no_fix", False))

    def prepare(self, image: ImageSpec, pack: PackSpec | None, workdir: Path, stop: threading.Event) -> Prepared:
        if not self.fix:
            from h2k.overlay import image_format

            src = resolve_image(image)
            pack_path = resolve_pack(pack)
            info = {"kind": image.kind, "fix": "not fixed (--no-fix)",
                    "pack_iso": _pack_iso(pack_path, workdir) if pack_path and image.mode == "boot" else None}
            return Prepared(image, pack, src, image_format(src), info=info)
        # Resolving may build a test-bed artefact: that happens in the child too, so it can be stopped.
        out = run_child("prepare", {
            # What passes a boot travels with each cell, not with the fix.
            "image_spec": {k: v for k, v in vars(image).items() if k != "expect"},
            "pack_spec": vars(pack) if pack else None,
            "output": str(workdir / "fixed.qcow2"),
        }, workdir, stop)
        return Prepared(image, pack, Path(out["base"]), "qcow2", info=out.get("info", {}))

    def run_cell(self, ctx: CellContext) -> CellOutcome:
        cell = ctx.cell
        if cell.mode == "fix+verify":
            return self._verify_cell(ctx)
        if ctx.connect and self.backend != "libvirt":
            raise InputError("--connect needs the libvirt backend")
        out = run_child("boot", {
            "image": str(ctx.overlay), "cell": cell.to_dict(), "info": ctx.prepared.info,
            "pack": ctx.prepared.info.get("pack_iso"), "memory_mb": ctx.memory_mb,
            "outdir": str(ctx.outdir / "boot"), "backend": self.backend, "connect": ctx.connect,
        }, ctx.outdir, ctx.stop)
        return CellOutcome(**out["outcome"], proof="real boot")


    def _verify_cell(self, ctx: CellContext) -> CellOutcome:
        cell = ctx.cell
        if cell.bus not in VERIFY_BUSES:  # nothing to share: verify this cell alone (and report why not)
            out = run_child("verify", {"image": str(ctx.overlay), "bus": cell.bus}, ctx.outdir, ctx.stop,
                            deadline=time.monotonic() + cell.timeout)
            return CellOutcome(**out["outcome"], lab_setup=dict(ctx.prepared.info.get("lab_setup") or {}))
        base = str(ctx.prepared.base)
        with self._lock:
            lock = self._verify_locks.setdefault(base, threading.Lock())
        with lock:
            got = self._verified.get(base)
            if got is None or isinstance(got, Interrupted):
                try:
                    got = run_child("verify", {"image": base, "bus": "both"}, ctx.outdir, ctx.stop,
                                    deadline=time.monotonic() + cell.timeout)
                except BaseException as exc:
                    got = exc
                self._verified[base] = got
        if isinstance(got, BaseException):
            raise got
        out = outcome_for_bus(got["rules"], cell.bus, shared_with=base)
        out.lab_setup = dict(ctx.prepared.info.get("lab_setup") or {})
        return out


# Buses h2k.verify has rules for (the VirtIO storage drivers).
VERIFY_BUSES = ("virtio-blk", "virtio-scsi")
BUS_DRIVER = {"virtio-blk": "viostor", "virtio-scsi": "vioscsi"}


def outcome_for_bus(rules: list[dict[str, Any]], bus: str, shared_with: str | None = None) -> CellOutcome:
    """A cell's verdict from the verify rules of its bus's driver plus the disk-wide ones (BCD)."""
    others = {d for b, d in BUS_DRIVER.items() if b != bus}
    mine = [r for r in rules if r["subject"] not in others]
    failed = [r for r in mine if not r["passed"]]
    reason = (f"{len(mine)} boot-readiness rules passed for {bus}" if not failed else
              "; ".join(f"{r['rule']}/{r['subject']}: {r['reason']}" for r in failed))
    phase: dict[str, Any] = {"phase": "verify", "bus": bus, "rules": mine}
    if shared_with:
        phase["verified"] = f"{shared_with} (read-only, once for both VirtIO buses)"
    return CellOutcome("passed" if not failed else "failed", reason, phases=[phase], proof="static verify")


# --- child side ---------------------------------------------------------------------


def _expected_os_problem(expected: str | None, facts) -> str | None:
    """None if the inspected Windows matches the matrix's ``os`` (e.g. windows-server-2019)."""
    if not expected:
        return None
    from h2k import winver

    name = winver.resolve_facts(facts).name
    have = set(re.split(r"[^a-z0-9]+", name.lower()))
    for token in expected.lower().split("-"):
        if token and token not in have:
            return f"the matrix expects {expected}, the image is {name}"
    return None


def _pack_iso(pack: Path, workdir: Path) -> str | None:
    """The pack as an ISO for the bootstrap phase's CD-ROM (a directory is packed into ``workdir``)."""
    if pack.is_file():
        return str(pack)
    iso = workdir / "driver-pack.iso"
    if not iso.exists():
        tmp = iso.with_name(f".{iso.name}.{os.getpid()}")
        subprocess.run(["xorriso", "-report_about", "SORRY", "-outdev", str(tmp), "-volid", "VIRTIO_WIN",
                        "-joliet", "on", "-rockridge", "on", "-map", str(pack), "/"], check=True,
                       capture_output=True)
        os.replace(tmp, iso)
    return str(iso)


def child_prepare(req: dict[str, Any]) -> dict[str, Any]:
    from h2k import overlay

    image = ImageSpec(**req["image_spec"])
    pack_spec = PackSpec(**req["pack_spec"]) if req.get("pack_spec") else None
    src, out = resolve_image(image), Path(req["output"])
    pack_path = resolve_pack(pack_spec)
    req = {"kind": image.kind, "mode": image.mode, "pack": str(pack_path) if pack_path else None,
           "expected_os": image.os}
    out.unlink(missing_ok=True)
    overlay.create_overlay(src, out)  # the fix writes only this overlay; the source stays untouched
    if req["kind"] == "linux":
        import importlib

        try:
            linux = importlib.import_module("h2k.linux")
        except ImportError as exc:
            raise InputError(f"the Linux pipeline (h2k.linux) is not available: {exc}") from None
        result = linux.fix_image(out, in_place=True)
        info = {"kind": "linux", "fix": result.summary() if hasattr(result, "summary") else _plain(result)}
        return {"base": str(out), "info": info}
    from h2k.driverpack import open_pack
    from h2k.fix import fix_image
    from h2k.plan import build_plan

    if not req.get("pack"):
        raise InputError("a Windows image needs a driver pack")
    pack = open_pack(req["pack"])
    problem: list[str] = []

    def planner(facts):
        msg = _expected_os_problem(req.get("expected_os"), facts)
        if msg:
            problem.append(msg)
            raise InputError(msg)
        return build_plan(facts, pack, "both")

    # EMS on COM1 in the BCD of the lab's copy (never the user's output): under TCG a bugcheck
    # reaches the lab only through EMS (no hv-crash), and <machine-info> shows the kernel came up.
    report = fix_image(out, planner, in_place=True, ems=True)
    facts = report.facts
    info = {
        "kind": "windows",
        "facts": {k: facts.get(k) for k in ("product_name", "build", "major", "minor", "is_server", "firmware", "arch")},
        "fix": report.summary(),
        "journal": report.journal,
        "lab_setup": {"ems": "EMS on COM1 (115200) enabled in the BCD of the lab's fixed copy "
                             f"{out.name}; the source image is untouched"},
        # Only boot cells attach the pack (bootstrap phase); fix+verify cells need no ISO.
        "pack_iso": _pack_iso(Path(req["pack"]), out.parent) if req["mode"] == "boot" else None,
    }
    return {"base": str(out), "info": info}


def child_verify(req: dict[str, Any]) -> dict[str, Any]:
    from h2k.verify import verify_image

    report = verify_image(req["image"], req["bus"])
    rules = [dict(vars(r)) for r in report.results]
    out = outcome_for_bus(rules, req["bus"]) if req["bus"] in VERIFY_BUSES else None
    outcome = vars(out) if out else {"verdict": "passed" if report.passed else "failed",
                                     "reason": "; ".join(f"{r['rule']}/{r['subject']}: {r['reason']}"
                                                         for r in rules if not r["passed"]) or "all rules passed",
                                     "phases": [{"phase": "verify", "rules": rules}]}
    return {"rules": rules, "outcome": outcome}


def profiles_for(cell: Cell, info: dict[str, Any], pack_iso: str | None, memory_mb: int):
    """(bootstrap, final) machine profiles for a cell; bootstrap is None for a direct boot."""
    from dataclasses import replace

    from h2k import domain

    facts = info.get("facts") or {}
    meta = {"os": cell.kind, "firmware": cell.firmware, "name": cell.image, "memory_mb": memory_mb,
            "build": facts.get("build") or 0, "is_server": bool(facts.get("is_server"))}
    if cell.bus in domain.FINAL_BUSES:
        final = domain.final_profile(meta, bus=cell.bus, nic=cell.nic)
    else:  # a legacy bus (sata, ide) is its own final machine
        final = replace(domain.bootstrap_profile(meta, bus=cell.bus, nic=cell.nic), stage="final")
    if cell.boot_mode == "direct":
        return None, replace(final, stage="direct")
    boot_bus = "ide" if cell.bus == "ide" else "sata"
    bootstrap = domain.bootstrap_profile(meta, bus=boot_bus, nic="e1000e", virtio_iso=pack_iso)
    return bootstrap, final


def cell_expect(cell: Cell):
    """What passes a cell's boots: the matrix's expect:, else the kind's default.

    A Windows cell boots a fresh fix, so h2k's first-boot installer runs in it: the agent it
    installs is the evidence (``Expect.for_os(..., first_boot=True)``), in both phases.
    """
    from lab.verdict import Expect

    windows = cell.kind == "windows"
    return Expect.for_os(cell.kind, first_boot=windows, collect_devices=windows,
                         success=[list(a) for a in cell.success] or None, success_patterns=list(cell.patterns))


def child_boot(req: dict[str, Any]) -> dict[str, Any]:
    from lab import boot as lab_boot

    cell = Cell.from_dict(req["cell"])
    bootstrap, final = profiles_for(cell, req.get("info") or {}, req.get("pack"), req["memory_mb"])
    expect = cell_expect(cell)
    outdir = Path(req["outdir"])
    kw = dict(timeout=cell.timeout, outdir=outdir, expect=expect, backend=req["backend"], connect=req.get("connect"))
    if bootstrap is None:
        result = lab_boot.boot(Path(req["image"]), final, **kw)
    else:
        result = lab_boot.boot_two_phase(Path(req["image"]), bootstrap, final, **kw)
    outcome = {
        "verdict": result.verdict, "reason": result.reason, "stop_code": result.stop_code,
        "stop_name": result.stop_name, "artifacts": dict(result.artifacts), "agent": _plain(result.agent),
        "phases": [{k: ph.get(k) for k in ("phase", "verdict", "reason", "seconds", "stop_code", "stop_name",
                                           "evidence")}
                   for ph in result.phases],
        "evidence": list(result.evidence),
        "lab_setup": {**(req.get("info") or {}).get("lab_setup", {}), "success": expect.alternatives(),
                      "patterns": list(expect.success_patterns)},
    }
    return {"outcome": outcome}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "__dict__", str(o))))


OPS = {"prepare": child_prepare, "verify": child_verify, "boot": child_boot}


def _die_with_parent() -> None:
    """SIGTERM this child when the runner dies (even by SIGKILL): the lab then stops its QEMU."""
    parent = os.environ.get("H2K_MATRIX_PARENT")
    if not parent:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # the runner died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def child_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    def interrupted(signum, frame):  # unwind like Ctrl-C so every finally (guestfs close, the lab's) runs
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    _die_with_parent()
    req_path, res_path = Path(argv[0]), Path(argv[1])
    req = json.loads(req_path.read_text())
    from h2k import accel

    accel.apply_libguestfs_env()
    try:
        data = OPS[req["op"]](req)
    except H2KError as exc:
        data = {"error": str(exc), "error_kind": type(exc).__name__}
    except KeyboardInterrupt:
        # Stopped: write no verdict. This child leads its own process group; end whatever is
        # left in it (a libguestfs appliance, a QEMU), itself included.
        os.killpg(os.getpgrp(), signal.SIGKILL)
        return 130
    except Exception as exc:  # a bug or a broken tool: 'incomplete', with the traceback in the log
        import traceback

        traceback.print_exc()
        data = {"error": f"{type(exc).__name__}: {exc}", "error_kind": "internal"}
    tmp = res_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, res_path)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
