"""pytest plugin: ``pytest --image win2019.qcow2 [--drivers virtio-win.iso] [--bus ...]``.

Registered through the ``pytest11`` entry point, so it is active wherever
hyper2kvm is installed; it adds command-line options and nothing else unless
``--image`` is given. With ``--image``, the session runs one test per cell
(image × firmware × bus × NIC) and only those (the project's own tests are
deselected):

* the image is fixed once (h2k's Windows engine with ``--drivers``, or the
  Linux pipeline), in a cache shared by pytest-xdist workers under a file
  lock, keyed by the image's path, size and mtime and the pack;
* each test boots its cell on its own qcow2 overlay with the lab and fails with
  the lab's verdict and reason (bugcheck code and name included);
* properties (verdict, the evidence that passed it, EMS on the lab's copy of a Windows image,
  artifacts) go to ``--junitxml`` via ``user_properties``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

GROUP = "hyper2kvm matrix (boot an image in every chosen configuration)"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hyper2kvm", GROUP)
    g.addoption("--image", action="append", default=[], metavar="DISK",
                help="a VM disk to fix and boot in every chosen cell (repeatable); "
                     "without it this plugin does nothing")
    g.addoption("--drivers", metavar="PACK", default=None,
                help="virtio-win ISO or directory for Windows images (the image is treated as Windows)")
    g.addoption("--image-kind", choices=("auto", "windows", "linux"), default="auto",
                help="windows or linux (default: windows when --drivers is given, else linux)")
    g.addoption("--firmware", action="append", default=[], choices=("auto", "bios", "uefi", "uefi-secureboot"),
                help="firmware (default auto: uefi for a GPT disk, bios for MBR); repeatable")
    g.addoption("--bus", action="append", default=[], choices=("virtio-blk", "virtio-scsi", "sata", "ide"),
                help="disk bus (default virtio-blk); repeatable")
    g.addoption("--nic", action="append", default=[],
                choices=("virtio-net", "e1000e", "e1000", "rtl8139", "vmxnet3", "none"),
                help="NIC model (default virtio-net); repeatable")
    g.addoption("--boot-mode", choices=("two-phase", "direct"), default=None,
                help="two-phase (bootstrap then final; default for Windows) or direct (default for Linux)")
    g.addoption("--boot-timeout", type=int, default=600, metavar="SECONDS", help="per boot phase (default 600)")
    g.addoption("--backend", choices=("qemu", "libvirt"), default="qemu", dest="h2k_backend",
                help="how the lab starts guests (default qemu)")
    g.addoption("--no-fix", action="store_true", default=False, dest="h2k_no_fix",
                help="boot the image as it is, without h2k's fix (the 'before' picture)")
    g.addoption("--success", action="append", default=[], dest="h2k_success", metavar="EVIDENCE[+EVIDENCE...]",
                help="what passes a boot: evidence names joined by '+' (agent, network, login, systemd-target, "
                     "ems, marker, pattern); repeat for alternatives (default: linux login | systemd-target | "
                     "agent; windows agent, after h2k's first-boot installer)")
    g.addoption("--expect-pattern", action="append", default=[], dest="h2k_expect_pattern", metavar="REGEX",
                help="console regex for the 'pattern' evidence (repeatable); without --success it alone decides")
    g.addoption("--matrix-out", metavar="DIR", default=None,
                help="where fixed images and boot artifacts go (default: under pytest's temp dir)")


# --- which cells --------------------------------------------------------------------


def disk_firmware(path: Path) -> str:
    """uefi for a GPT disk, bios otherwise: the partition table read through qemu-img (any format)."""
    fmt = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                                    capture_output=True, text=True).stdout)["format"]
    with tempfile.TemporaryDirectory(prefix="h2k-head-") as tmp:
        out = Path(tmp) / "head.raw"
        subprocess.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", f"if={path}", f"of={out}", "bs=512", "count=2"],
                       check=True, capture_output=True)
        head = out.read_bytes()
    return "uefi" if head[512:520] == b"EFI PART" else "bios"


def _name(path: Path) -> str:
    stem = path.name.split(".")[0] or "image"
    return "".join(ch if ch.isalnum() or ch in "_-" else "-" for ch in stem)


def build_cells(config: pytest.Config):
    from matrix.expand import expand
    from matrix.load import build_spec

    drivers = config.getoption("drivers")
    kind = config.getoption("image_kind")
    if kind == "auto":
        kind = "windows" if drivers else "linux"
    images = []
    names: set[str] = set()
    for raw in config.getoption("image"):
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise pytest.UsageError(f"--image {raw}: no such disk image")
        name = _name(path)
        while name in names:
            name += "-x"
        names.add(name)
        firmware = [f for f in config.getoption("firmware") if f != "auto"]
        if not firmware:
            firmware = [disk_firmware(path)]
        image: dict[str, Any] = {"name": name, "kind": kind, "path": str(path), "firmware": firmware}
        expect = {k: v for k, v in (("success", config.getoption("h2k_success")),
                                    ("patterns", config.getoption("h2k_expect_pattern"))) if v}
        if expect:
            image["expect"] = expect
        images.append(image)
    data: dict[str, Any] = {
        "name": "pytest",
        "images": images,
        "bus": config.getoption("bus") or ["virtio-blk"],
        "nic": config.getoption("nic") or ["virtio-net"],
        "boot_mode": [config.getoption("boot_mode") or ("two-phase" if kind == "windows" else "direct")],
        "timeouts": {"default": config.getoption("boot_timeout")},
    }
    if kind == "windows":
        if not drivers:
            raise pytest.UsageError("Windows images need --drivers (a virtio-win ISO or directory)")
        data["packs"] = [{"name": "drivers", "path": str(Path(drivers).expanduser().resolve())}]
    try:
        spec = build_spec(data, "pytest options")
        return spec, expand(spec)  # expand checks each cell's success (e.g. a pattern no alternative uses)
    except Exception as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    config._h2k_matrix = None
    if config.getoption("image", default=None):
        config._h2k_matrix = build_cells(config)


# --- items ----------------------------------------------------------------------------


class MatrixCells(pytest.Collector):
    def collect(self):
        spec, cells = self.config._h2k_matrix
        for cell in cells:
            yield CellItem.from_parent(self, name=cell.id, spec=spec, cell=cell)


class CellItem(pytest.Item):
    def __init__(self, *, spec, cell, **kw) -> None:
        super().__init__(**kw)
        self.spec = spec
        self.cell = cell

    def runtest(self) -> None:
        from matrix.executors import LabExecutor
        from matrix.reports import failure_message
        from matrix.runner import CellContext, create_overlay, default_memory_mb

        outroot = _outroot(self.config)
        image = self.spec.image(self.cell.image)
        pack = self.spec.pack(self.cell.pack)
        executor = LabExecutor(backend=self.config.getoption("h2k_backend"),
                               fix=not self.config.getoption("h2k_no_fix"))
        prepared = prepare_cached(executor, image, pack, outroot / "prepared")
        cell_dir = outroot / "cells" / self.cell.id
        cell_dir.mkdir(parents=True, exist_ok=True)
        overlay = cell_dir / "disk.qcow2"
        create_overlay(prepared.base, prepared.base_format, overlay)
        ctx = CellContext(self.cell, prepared, overlay, cell_dir, None, threading.Event(),
                          default_memory_mb(image))
        try:
            out = executor.run_cell(ctx)
        finally:
            overlay.unlink(missing_ok=True)  # the artifacts stay; the disk state is not evidence
        from matrix.model import CellResult

        result = CellResult(self.cell, out.verdict, out.reason, out.stop_code, out.stop_name,
                            artifacts=out.artifacts, agent=out.agent, phases=out.phases, evidence=out.evidence,
                            lab_setup=out.lab_setup, proof=out.proof)
        self.user_properties.append(("verdict", out.verdict))
        self.user_properties.append(("proof", result.proof))
        if out.evidence:
            self.user_properties.append(("evidence", "+".join(out.evidence)))
        if out.lab_setup.get("ems"):
            self.user_properties.append(("lab_setup:ems", out.lab_setup["ems"]))
        if out.stop_code is not None:
            self.user_properties.append(("stop_code", f"0x{out.stop_code:X}"))
        for k, v in sorted(out.artifacts.items()):
            self.user_properties.append((f"artifact:{k}", v))
        if not result.good:
            raise CellFailed(failure_message(result))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CellFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"h2k cell {self.cell.id}"


class CellFailed(Exception):
    """The lab's verdict for a cell was not passed/softfailed."""


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    if not getattr(config, "_h2k_matrix", None):
        return
    collector = MatrixCells.from_parent(session, name="h2k-matrix", nodeid="h2k-matrix")
    ours = list(collector.collect())
    if items:
        config.hook.pytest_deselected(items=list(items))
    items[:] = ours


def _outroot(config: pytest.Config) -> Path:
    given = config.getoption("matrix_out")
    if given:
        root = Path(given)
    else:
        # Under xdist each worker has its own basetemp; their parent is shared, so is the fix cache.
        base = config._tmp_path_factory.getbasetemp()
        root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "h2k-matrix"
    root.mkdir(parents=True, exist_ok=True)
    return root


def prepare_cached(executor, image, pack, root: Path):
    """Fix (image, pack) once across xdist workers: a file lock and a key of path, size, mtime, pack."""
    from matrix.runner import Prepared

    st = Path(image.path).stat()
    key_src = json.dumps([image.path, st.st_size, st.st_mtime_ns, image.kind, pack.path if pack else None,
                          executor.fix])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    workdir = root / f"{image.name}-{key}"
    workdir.mkdir(parents=True, exist_ok=True)
    done = workdir / "prepared.json"
    with open(root / f".{image.name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            d = json.loads(done.read_text())
            return Prepared(image, pack, Path(d["base"]), d["format"], d["info"])
        prepared = executor.prepare(image, pack, workdir, threading.Event())
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps({"base": str(prepared.base), "format": prepared.base_format,
                                   "info": prepared.info}))
        os.replace(tmp, done)
        return prepared
