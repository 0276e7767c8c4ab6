"""`h2k matrix run --connect URI1,URI2`: cells spread over two libvirt hosts that share no files
with the runner, and the storage path under them (uploads that are exact and stay sparse, a
backing chain flattened, volumes deleted).

The two hosts are private libvirtds (lab.libvirtd), each in its own mount namespace with its
own config, run, state and storage directories, reached only over loopback TCP; the runner's
files (/tmp, /root, the repository) do not exist inside them. Two real boots (one passes, one
panics), run in parallel, one per host.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from lab import libvirt_storage, tinyguest
from lab.libvirtd import LibvirtDaemons

from libvirt_checks import assert_host_side_only, assert_nothing_on_the_host

pytestmark = [pytest.mark.xdist_group("libvirt-remote")]

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.fixture(scope="module")
def hosts():
    started: list[LibvirtDaemons] = []
    try:
        for _ in range(2):
            d = LibvirtDaemons()
            d.start()
            started.append(d)
        yield started
    finally:
        for d in started:
            d.stop()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def test_uploads_are_exact_sparse_and_flattened(hosts, tmp_path) -> None:
    host = hosts[0]
    # The host cannot see the runner's files (seen through /proc/<daemon>/root: its own view).
    for path in (tmp_path, Path(__file__)):
        assert path.exists() and not host.host_path(str(path)).exists(), path
    # A sparse raw file: 48 MiB with three islands of data (start, middle, unaligned tail).
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as fh:
        fh.truncate(48 * MIB)
        for off, byte in ((0, b"\xa1"), (20 * MIB + 4096, b"\xb2"), (48 * MIB - 3000, b"\xc3")):
            fh.seek(off)
            fh.write(byte * 3000)
    # A backing chain: a qcow2 base and an overlay that changes part of it (written by qemu-io).
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(base)], check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", str(top)], check=True, capture_output=True)

    conn = libvirt.open(host.uri)
    try:
        vols = libvirt_storage.BootVolumes(conn, "h2k-uploadtest")
        name = vols.upload(raw, "sparse.raw")
        on_host = host.storage_dir / "h2k" / name
        assert sha256(on_host) == sha256(raw)
        assert on_host.stat().st_blocks * 512 < 4 * MIB  # the holes stayed holes on the host
        back = tmp_path / "back.raw"
        vols.download(name, back)
        assert sha256(back) == sha256(raw)

        shape = libvirt_storage.image_shape(top)
        assert (shape.format, shape.chain) == ("qcow2", 2) and libvirt_storage.needs_flattening(shape)
        flat = libvirt_storage.flatten(top, tmp_path / "flat.qcow2")
        qname = vols.upload(flat, "disk.qcow2")
        on_host = host.storage_dir / "h2k" / qname
        # qemu-img's own comparison: the host's volume holds what the whole chain holds, alone.
        subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(top), str(on_host)], check=True,
                       capture_output=True)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(on_host)], check=True,
                                         capture_output=True, text=True).stdout)
        assert "backing-filename" not in info
        assert vols.delete_all() == []
    finally:
        conn.close()
    assert_nothing_on_the_host(host)


MATRIX = textwrap.dedent(
    """
    name: remote
    images:
      - {name: tiny-pass, kind: linux, path: "PASS_DISK", firmware: [bios]}
      - {name: tiny-panic, kind: linux, path: "PANIC_DISK", firmware: [bios]}
    firmware: [bios]
    bus: [virtio-blk]
    nic: [virtio-net]
    boot_mode: [direct]
    timeouts: {default: 480}
    """
)


@pytest.mark.boot
def test_matrix_run_spreads_cells_over_two_hosts(hosts, tmp_path) -> None:
    m = tmp_path / "remote.yaml"
    m.write_text(MATRIX.replace("PASS_DISK", str(tinyguest.disk_image("pass")))
                 .replace("PANIC_DISK", str(tinyguest.disk_image("panic"))))
    out = tmp_path / "out"
    private_tmp = tmp_path / "tmp"  # the runner's and the lab's temp files: checked empty at the end
    private_tmp.mkdir()
    uris = [h.uri for h in hosts]
    proc = subprocess.run([sys.executable, "-m", "h2k", "matrix", "run", str(m), "--no-fix", "-j", "2",
                           "--connect", ",".join(uris), "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200,
                          env={**os.environ, "TMPDIR": str(private_tmp)})
    assert proc.returncode == 1, proc.stderr  # one cell failed, as it must
    results = {c["id"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    passed = results["tiny-pass.bios.virtio-blk.virtio-net"]
    panicked = results["tiny-panic.bios.virtio-blk.virtio-net"]
    # Passed on the matrix's Linux evidence (whichever came first: the agent through libvirt, the marker).
    assert passed["verdict"] == "passed" and passed["evidence"], passed
    assert panicked["verdict"] == "failed" and "guest panicked (pvpanic GUEST_PANICKED" in panicked["reason"], panicked
    # One cell per host, and each host really ran it: its own QEMU log names that cell's domain.
    assert sorted(c["host"] for c in results.values()) == sorted(uris)
    for cell in results.values():
        host = hosts[uris.index(cell["host"])]
        boot_dir = Path(cell["artifacts"]["qemu.log"]).parent
        assert_host_side_only(boot_dir)
        name = ET.fromstring((boot_dir / "domain.xml").read_text()).findtext("name")
        logs = sorted(p.name for p in host.qemu_log_dir.glob("h2k-*.log"))
        assert logs == [f"{name}.log"], (cell["id"], logs)
        assert "-no-user-config" in (host.qemu_log_dir / f"{name}.log").read_text()  # QEMU's own start line
        # The console came over the host's stream (the passing cell may end on the agent's word
        # before its marker is printed, so the kernel's banner is what both must show).
        serial = Path(cell["artifacts"]["serial.log"]).read_text(errors="replace")
        assert "Linux version" in serial and ("sysrq triggered crash" in serial) == (cell is panicked)
    assert (Path(panicked["artifacts"]["screen.png"])).read_bytes()[:4] == b"\x89PNG"
    for host in hosts:
        assert_nothing_on_the_host(host)
    assert os.listdir(private_tmp) == []
