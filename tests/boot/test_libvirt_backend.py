"""The libvirt backend boots the lab's tiny guests for real and reaches the same verdicts
as the direct QEMU backend: passed (with agent and network), a pvpanic GUEST_PANICKED,
a reboot loop (SHUTDOWN guest-reset), on SeaBIOS and OVMF; and it leaves nothing behind.

The daemons are private (lab.libvirtd, session fixture); the boots run two at a
time in one module fixture to stay within the time budget on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from h2k import domain, libvirt_xml  # noqa: E402
from lab import tinyguest  # noqa: E402
from lab.boot import boot, boot_two_phase  # noqa: E402
from lab.libvirtd import LibvirtDaemons  # noqa: E402
from lab.verdict import Expect  # noqa: E402

pytestmark = [
    pytest.mark.boot,
    pytest.mark.xdist_group("libvirt"),  # one private libvirtd at a time
    pytest.mark.skipif(os.geteuid() != 0, reason="a private qemu:///system libvirtd needs root"),
]

TIMEOUT = 480  # per boot: ~15-80 s on a quiet 2-core host, but a starved one (load 30) needs minutes
DEADLINE = {"hang": 45, "silent": 20}  # boots that must end in a timeout (as in test_lab_boot.py)


@pytest.fixture(scope="session")
def libvirt_uri():
    d = LibvirtDaemons()
    uri = d.start()
    yield uri
    d.stop()


# (case id, backend, firmware, tiny-guest mode, how it boots, expected verdict, deciding signal)
CASES = [
    # The longest (two UEFI boots in a row) first, so the pool's two workers end together.
    ("uefi-two-phase", "libvirt", "uefi", "pass", "two-phase", "passed", "success"),
    ("bios-pass", "libvirt", "bios", "pass", "kernel", "passed", "success"),
    ("bios-panic", "libvirt", "bios", "panic", "kernel", "failed", "qmp-panic"),
    ("bios-reboot", "libvirt", "bios", "reboot", "kernel", "failed", "qmp-reset"),
    ("uefi-panic", "libvirt", "uefi", "panic", "kernel", "failed", "qmp-panic"),
    ("uefi-reboot", "libvirt", "uefi", "reboot", "kernel", "failed", "qmp-reset"),
    # A guest that boots and then hangs, and one that never prints: both end at the deadline.
    ("bios-timeout", "libvirt", "bios", "hang", "kernel", "timeout", "deadline"),
    ("uefi-timeout", "libvirt", "uefi", "hang", "kernel", "timeout", "deadline"),
    ("bios-silent", "libvirt", "bios", "silent", "kernel", "timeout", "deadline"),
    ("uefi-silent", "libvirt", "uefi", "silent", "kernel", "timeout", "deadline"),
    # The same guest under the direct backend, side by side with its libvirt twin.
    ("bios-panic-direct", "qemu", "bios", "panic", "kernel", "failed", "qmp-panic"),
]


def _run_case(case, uri: str, root: Path):
    cid, backend, fw, mode, how, _, _ = case
    out = root / cid
    t = time.monotonic()
    if how == "two-phase":
        # A real disk through OVMF: h2k.domain's bootstrap (SATA, e1000e) to success, a clean
        # shutdown through the agent, then its final machine (virtio-blk, virtio-net), one NVRAM.
        meta = {"os": "linux", "firmware": fw, "name": "tiny", "memory_mb": 512, "cpus": 1}
        res = boot_two_phase(tinyguest.disk_image(mode), domain.bootstrap_profile(meta), domain.final_profile(meta),
                             timeout=TIMEOUT, outdir=out, expect=Expect(require_agent=True), final_expect=Expect(),
                             backend="libvirt", connect=uri)
        return res, time.monotonic() - t
    else:
        prof = tinyguest.kernel_profile(mode, firmware=fw)
        # On a starved host (TCG, many guests on 2 cores) the kernel's IO-APIC timer check
        # can fail and panic; that is the host, not the backend.
        prof = replace(prof, append=f"{prof.append} no_timer_check")
        image, vars_file = None, None
        # The BIOS pass boot also proves the agent bridge: ping, OS info, IPv4, gateway ping.
        expect = Expect(require_agent=True, require_network=True) if cid == "bios-pass" else Expect()
    kw = {"connect": uri} if backend == "libvirt" else {}
    res = boot(image, prof, timeout=DEADLINE.get(mode, TIMEOUT), outdir=out, expect=expect, backend=backend,
               vars_file=vars_file, **kw)
    return res, time.monotonic() - t


@pytest.fixture(scope="module")
def results(libvirt_uri, tmp_path_factory):
    # Build the cached guest artefacts once, before the boots race for them.
    tinyguest.initramfs()
    tinyguest.disk_image("pass")
    root = tmp_path_factory.mktemp("libvirt-boots")
    # The lab's per-boot temp dirs go to a private dir so "nothing left" is checkable
    # while other tests boot in parallel.
    private_tmp = root / "tmp"
    private_tmp.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(private_tmp)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            futs = {c[0]: pool.submit(_run_case, c, libvirt_uri, root) for c in CASES}
            res = {k: f.result() for k, f in futs.items()}
    finally:
        tempfile.tempdir = saved
    return {"boots": res, "root": root, "private_tmp": private_tmp}


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "libvirt"], ids=[c[0] for c in CASES if c[1] == "libvirt"])
def test_verdicts_match_the_direct_backend(results, case) -> None:
    cid, _, fw, mode, how, verdict, sig = case
    res, secs = results["boots"][cid]
    assert res.backend == "libvirt"
    assert (res.verdict, res.signal) == (verdict, sig), f"{cid}: {res.one_line()} [{res.signal}]"
    out = results["root"] / cid
    if how == "two-phase":
        out = out / "final"
    for name in ("serial.log", "qmp.jsonl", "qemu.log", "verdict.json", "domain.xml"):
        assert (out / name).exists(), f"{cid}: {name} missing"
    assert json.loads((out / "verdict.json").read_text())["verdict"] == verdict
    qmp = [json.loads(line)["msg"] for line in (out / "qmp.jsonl").read_text().splitlines()]
    events = [m.get("event") for m in qmp if "event" in m]
    assert events[0] == "RESUME"  # created paused, watchers attached, then resumed
    serial = (out / "serial.log").read_text(errors="replace")
    if mode == "pass":
        assert "H2K-BOOT-OK" in serial
    if mode == "panic":
        # The same event shape the direct backend's QMP client records.
        panicked = [m for m in qmp if m.get("event") == "GUEST_PANICKED"]
        assert panicked and panicked[0]["data"]["action"] and "timestamp" in panicked[0]
        assert "sysrq triggered crash" in serial
        assert (out / "screen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # on_crash=preserve keeps it
    if mode == "reboot":
        resets = [m for m in qmp if m.get("event") == "SHUTDOWN" and m["data"].get("reason") == "guest-reset"]
        assert resets and resets[0]["data"]["guest"] is True
    if mode in DEADLINE:
        assert DEADLINE[mode] <= res.seconds < DEADLINE[mode] + 30, res.seconds
        assert "H2K-BOOT-OK" not in serial
        # Nothing from the guest: no panic, no reset or shutdown of its own (the lab's destroy at
        # the deadline is a SHUTDOWN with guest=false).
        guest = [m for m in qmp if m.get("event") == "GUEST_PANICKED"
                 or (m.get("event") == "SHUTDOWN" and m["data"].get("guest"))]
        assert guest == [], guest
    if mode == "silent":
        assert "h2k-tinyguest" not in serial and "Linux version" not in serial
    xml = (out / "domain.xml").read_text()
    assert ("<loader" in xml) == (fw == "uefi")


def test_agent_bridge_and_network_under_libvirt(results) -> None:
    res, _ = results["boots"]["bios-pass"]
    assert "gateway 10.0.2.2 answers ping" in res.reason
    assert res.agent["osinfo"]["id"] == "h2k-tinyguest"
    assert any(a.startswith("10.0.2.") for addrs in res.agent["ipv4"].values() for a in addrs)
    log = [json.loads(line) for line in (results["root"] / "bios-pass" / "agent.jsonl").read_text().splitlines()]
    assert any(r["msg"].get("execute") == "guest-exec" for r in log)


def test_two_phase_uefi_disk_boot_keeps_its_nvram(results) -> None:
    res, _ = results["boots"]["uefi-two-phase"]
    out = results["root"] / "uefi-two-phase"
    assert [p["phase"] for p in res.phases] == ["bootstrap", "final"]
    assert all(p["backend"] == "libvirt" and p["verdict"] == "passed" for p in res.phases)
    assert "shut down cleanly (guest agent shutdown, SHUTDOWN reason guest-shutdown)" in res.phases[0]["reason"]
    kept = out / "OVMF_VARS.fd"
    ovmf = libvirt_xml.find_ovmf(secure=False)
    # libvirt made the VM's VARS file from the template at bootstrap, and the final boot reused it.
    assert kept.exists() and kept.stat().st_size == Path(ovmf.vars_template).stat().st_size
    boot_xml = (out / "bootstrap" / "domain.xml").read_text()
    final_xml = (out / "final" / "domain.xml").read_text()
    for xml in (boot_xml, final_xml):
        assert f">{kept}</nvram>" in xml and "<loader" in xml
    assert 'bus="sata"' in boot_xml and 'type="e1000e"' in boot_xml
    assert 'bus="virtio"' in final_xml and 'type="virtio"' in final_xml


def test_same_verdict_as_direct_backend_side_by_side(results) -> None:
    lv, _ = results["boots"]["bios-panic"]
    qd, _ = results["boots"]["bios-panic-direct"]
    assert qd.backend == "qemu" and lv.backend == "libvirt"
    assert (lv.verdict, lv.signal, lv.stop_code) == (qd.verdict, qd.signal, qd.stop_code)
    assert lv.reason.split(";")[0] == qd.reason.split(";")[0]


def test_nothing_left_behind(results, libvirt_uri) -> None:
    conn = libvirt.open(libvirt_uri)
    try:
        assert [d.name() for d in conn.listAllDomains() if d.name().startswith("h2k-")] == []
    finally:
        conn.close()
    assert os.listdir(results["private_tmp"]) == []  # overlays, sockets, NVRAM copies all gone
    for cid, (res, secs) in results["boots"].items():
        if res.backend == "libvirt":
            # The lab's own overhead (overlay, define+start, teardown) is measured for every
            # boot; ~2-3 s here on a quiet host, but a starved host (load 20+) stretches it.
            assert 0 < res.timings["lab_start"] < 60 and 0 < res.timings["teardown"] < 60, (cid, res.timings)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lab import tinyguest
    from lab.boot import boot
    prof = tinyguest.kernel_profile("hang")
    print("starting", flush=True)
    boot(None, prof, timeout=300, outdir=Path(sys.argv[2]), backend="libvirt", connect=sys.argv[1])
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_boot_leaves_no_domain_or_files(libvirt_uri, tmp_path, signum) -> None:
    from lab.backend_libvirt import ensure_event_loop

    ensure_event_loop()
    conn = libvirt.open(libvirt_uri)
    resumed = threading.Event()
    seen: list[str] = []

    def on_life(c, dom, event, detail, opaque):
        if dom.name().startswith("h2k-") and event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            seen.append(dom.name())
            resumed.set()

    cb = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_life, None)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, libvirt_uri, str(tmp_path / "out")],
                            cwd=str(Path(__file__).resolve().parents[2]), env={**os.environ, "TMPDIR": str(private_tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert resumed.wait(timeout=120), "the lab's domain never started running"
        assert os.listdir(private_tmp), "the boot's temp dir should exist while it runs"
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        conn.domainEventDeregisterAny(cb)
    names = [d.name() for d in conn.listAllDomains()]
    conn.close()
    assert seen[0] not in names  # destroyed
    assert os.listdir(private_tmp) == []  # overlay dir, sockets: gone
    assert proc.returncode != 0


# (profile, what QEMU's command line must then contain) -- the machines no tiny guest boots.
STARTS = [
    ("win11-bootstrap", lambda iso: domain.bootstrap_profile({"os": "windows", "firmware": "uefi", "build": 22631},
                                                             virtio_iso=iso, memory_mb=512),
     ["smm=on", "driver=cfi.pflash01,property=secure,value=on", "OVMF_CODE_4M.secboot.fd", "tpm-crb",
      "-tpmdev emulator", "hv-crash", "hv-relaxed=on", '"driver":"ide-hd"', '"driver":"ide-cd"', '"driver":"e1000e"',
      '"driver":"pvpanic","ioport":1285', "org.qemu.guest_agent.0"]),
    ("win-ide-bootstrap", lambda iso: domain.bootstrap_profile({"os": "windows", "firmware": "bios"}, bus="ide",
                                                               virtio_iso=iso, memory_mb=512),
     ["pc-i440fx", '"driver":"ide-hd"', '"driver":"ide-cd"', "hv-crash", '"driver":"e1000e"']),
    ("win-scsi-final", lambda iso: domain.final_profile({"os": "windows", "firmware": "uefi"}, bus="virtio-scsi",
                                                        memory_mb=512),
     ["pc-q35", "OVMF_CODE_4M.fd", '"driver":"virtio-scsi-pci"', '"driver":"scsi-hd"', '"driver":"virtio-net-pci"',
      "hv-crash"]),
]


@pytest.mark.parametrize("name,make,expected", STARTS, ids=[s[0] for s in STARTS])
def test_libvirt_starts_machines_no_tiny_guest_boots(libvirt_uri, tmp_path, name, make, expected) -> None:
    """Secure Boot + TPM, IDE on i440fx, virtio-scsi, Hyper-V: libvirt accepts each XML and
    starts QEMU (paused, never run) with the devices the direct backend would use."""
    import subprocess as sp
    import uuid

    from lab.backend_libvirt import LIBVIRT_QEMU_LOG_DIR

    disk, iso = tmp_path / "d.qcow2", tmp_path / "virtio-win.iso"
    sp.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    iso.write_bytes(b"\0" * 2048 * 16)
    prof = replace(make(str(iso)), name=f"h2k-{uuid.uuid4().hex[:8]}-{name}")
    files = libvirt_xml.DomainFiles(disk=str(disk), serial_socket=str(tmp_path / "c.sock"),
                                    serial_log=str(tmp_path / "serial.log"), agent_socket=str(tmp_path / "a.sock"),
                                    nvram=str(tmp_path / "VARS.fd") if prof.uefi else None)
    xml = libvirt_xml.domain_xml(prof, files, libvirt_xml.XmlOptions("qemu", lab=True, qemu_as_root=True))
    conn = libvirt.open(libvirt_uri)
    log = LIBVIRT_QEMU_LOG_DIR / f"{prof.name}.log"
    try:
        dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED | libvirt.VIR_DOMAIN_START_AUTODESTROY)
        try:
            assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            cmdline = log.read_text()
        finally:
            dom.destroy()
    finally:
        conn.close()
        log.unlink(missing_ok=True)
    missing = [e for e in expected if e not in cmdline]
    assert not missing, f"{name}: not on QEMU's command line: {missing}"
    if prof.uefi:
        assert (tmp_path / "VARS.fd").stat().st_size > 0  # libvirt made the NVRAM from the template
