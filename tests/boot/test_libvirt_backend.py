"""The libvirt backend boots the lab's tiny guests for real on a libvirt host that shares no
files with the lab, and reaches the same verdicts as the direct QEMU backend: passed (with agent
and network), a pvpanic GUEST_PANICKED, a reboot loop (SHUTDOWN guest-reset), on SeaBIOS and
OVMF; a guest reboot within the allowance (the host restarts the guest, the lab counts it once); QEMU runs as the host's own unprivileged user; and nothing is left behind.

The host is a private libvirtd in its own mount namespace (lab.libvirtd: its own config, run,
state and storage directories; the lab's temp dirs, /root and /boot do not exist in it),
reached only over qemu+tcp://127.0.0.1:PORT/system. A domain that named a file of the lab
could not start there. The boots run two at a time in one module fixture (time budget).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from h2k import domain, libvirt_xml
from lab import tinyguest
from lab.boot import boot, boot_two_phase
from lab.libvirtd import LibvirtDaemons
from lab.verdict import Expect
from libvirt_checks import QEMU_USER, assert_host_side_only, assert_nothing_on_the_host
from tinyguest_checks import counter_line, printed_counts

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("libvirt")]

TIMEOUT = 480  # per boot: ~15-80 s on a quiet 2-core host, but a starved one (load 30) needs minutes
MODULE_BUDGET = 1800  # all the module's boots, two at a time, on a starved host
DEADLINE = {"hang": 45, "silent": 20}  # boots that must end in a timeout (as in test_lab_boot.py)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def libvirt_host():
    d = LibvirtDaemons()
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def libvirt_uri(libvirt_host) -> str:
    return libvirt_host.uri


# (case id, backend, firmware, tiny-guest mode, how it boots, expected verdict, deciding signal)
CASES = [
    # The longest chain (two UEFI boots in a row, then bios-pass: CHAINED) first, so the pool's two
    # workers end together.
    ("uefi-two-phase", "libvirt", "uefi", "pass", "two-phase", "passed", "success"),
    # Booted from the same disk as the two-phase run, right after it (same worker): counts 1 again.
    ("bios-pass", "libvirt", "bios", "pass", "disk", "passed", "success"),
    ("bios-panic", "libvirt", "bios", "panic", "kernel", "failed", "qmp-panic"),
    ("bios-reboot", "libvirt", "bios", "reboot", "kernel", "failed", "qmp-reset"),
    ("uefi-panic", "libvirt", "uefi", "panic", "kernel", "failed", "qmp-panic"),
    ("uefi-reboot", "libvirt", "uefi", "reboot", "kernel", "failed", "qmp-reset"),
    # One guest reboot allowed (on_reboot=restart): the guest's agent answers, it reboots, passes.
    ("bios-reboot-until-2", "libvirt", "bios", "reboot-until=2", "disk", "passed", "success"),
    # A guest that boots and then hangs, and one that never prints: both end at the deadline.
    # (The deadline itself is lab.scoring's, shared with the direct backend: one of each kind here.)
    ("bios-timeout", "libvirt", "bios", "hang", "kernel", "timeout", "deadline"),
    ("uefi-silent", "libvirt", "uefi", "silent", "kernel", "timeout", "deadline"),
    # The same guest under the direct backend, side by side with its libvirt twin.
    ("bios-panic-direct", "qemu", "bios", "panic", "kernel", "failed", "qmp-panic"),
]
CHAINED = ("uefi-two-phase", "bios-pass")  # one worker, in this order
EXPECT = {"bios-pass": Expect(require_agent=True, require_network=True),
          "bios-reboot-until-2": Expect(require_agent=True, max_reboots=1)}


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
    elif how == "disk":
        prof, image, vars_file = tinyguest.disk_profile(fw), tinyguest.disk_image(mode), None
    else:
        prof = tinyguest.kernel_profile(mode, firmware=fw)
        # On a starved host (TCG, many guests on 2 cores) the kernel's IO-APIC timer check
        # can fail and panic; that is the host, not the backend.
        prof = replace(prof, append=f"{prof.append} no_timer_check")
        image, vars_file = None, None
    # The BIOS pass boot also proves the agent bridge: ping, OS info, IPv4, gateway ping.
    expect = EXPECT.get(cid, Expect())
    kw = {"connect": uri} if backend == "libvirt" else {}
    res = boot(image, prof, timeout=DEADLINE.get(mode, TIMEOUT), outdir=out, expect=expect, backend=backend,
               vars_file=vars_file, **kw)
    return res, time.monotonic() - t


@pytest.fixture(scope="module")
def results(libvirt_uri, tmp_path_factory):
    # Build the cached guest artefacts once, before the boots race for them.
    tinyguest.initramfs()
    tinyguest.disk_image("pass"), tinyguest.disk_image("reboot-until=2")
    root = tmp_path_factory.mktemp("libvirt-boots")
    # The lab's per-boot temp dirs go to a private dir so "nothing left" is checkable
    # while other tests boot in parallel.
    private_tmp = root / "tmp"
    private_tmp.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(private_tmp)
    try:
        pool = ThreadPoolExecutor(max_workers=2)
        try:
            chained = [c for cid in CHAINED for c in CASES if c[0] == cid]
            chain = pool.submit(lambda: [_run_case(c, libvirt_uri, root) for c in chained])
            futs = {c[0]: pool.submit(_run_case, c, libvirt_uri, root) for c in CASES if c[0] not in CHAINED}
            # Bounded: a wedged boot fails the module instead of holding the whole run.
            res = {k: f.result(timeout=MODULE_BUDGET) for k, f in futs.items()}
            res.update(zip(CHAINED, chain.result(timeout=MODULE_BUDGET)))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
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
    for name in ("serial.log", "qmp.jsonl", "qemu.log", "verdict.json", "domain.xml", "domain.live.xml"):
        assert (out / name).exists(), f"{cid}: {name} missing"
    assert_host_side_only(out)
    # The local qemu.log is libvirt's account of the QEMU process: created, resumed, stopped.
    events = (out / "qemu.log").read_text()
    assert "created paused" in events and "resumed" in events and "stopped (" in events, events
    assert json.loads((out / "verdict.json").read_text())["verdict"] == verdict
    qmp = [json.loads(line)["msg"] for line in (out / "qmp.jsonl").read_text().splitlines()]
    qmp_events = [m.get("event") for m in qmp if "event" in m]
    assert qmp_events[0] == "RESUME"  # created paused, watchers attached, then resumed
    serial = (out / "serial.log").read_text(errors="replace")
    if mode == "pass":
        assert "H2K-BOOT-OK" in serial
    if mode == "panic":
        # The same event shape the direct backend's QMP client records.
        panicked = [m for m in qmp if m.get("event") == "GUEST_PANICKED"]
        assert panicked and panicked[0]["data"]["action"] and "timestamp" in panicked[0]
        assert "sysrq triggered crash" in serial
        # on_crash=preserve keeps it paused: virDomainScreenshot over a stream
        assert (out / "screen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if mode == "reboot":
        resets = [m for m in qmp if m.get("event") == "SHUTDOWN" and m["data"].get("reason") == "guest-reset"]
        assert resets and resets[0]["data"]["guest"] is True
        assert res.reason == "reboot loop: 1 guest reset before success (none allowed)", res.reason
    if mode.startswith("reboot-until"):
        # The host restarted the guest itself (on_reboot=restart): one guest reboot, whatever
        # number of RESET events SeaBIOS's own hard reboot adds, and the agent bridge served both boots.
        assert ET.fromstring((out / "domain.live.xml").read_text()).findtext("on_reboot") == "restart"
        assert res.reboots == 1 and res.reason.startswith("after 1 guest reboot: console marker"), res.reason
        resets = [m for m in qmp if m.get("event") == "RESET" and m["data"].get("reason") == "guest-reset"]
        assert len(resets) >= 2, qmp_events
        assert printed_counts(out / "serial.log") == {"1", "2"} and "H2K-BOOT-OK" in serial
        agent = [json.loads(line)["msg"] for line in (out / "agent.jsonl").read_text().splitlines()]
        assert sum("pretty-name" in str(m.get("return", "")) for m in agent) == 2
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
    live = (out / "domain.live.xml").read_text()
    assert ("<loader" in live) == (fw == "uefi")  # the host picked its own OVMF


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
    # The host made the VM's VARS volume from its template at bootstrap, OVMF wrote its boot
    # variables into it, and it came back to the lab (a download; same size, other bytes).
    template = Path(ovmf.vars_template).read_bytes()
    assert kept.exists() and kept.stat().st_size == len(template) and kept.read_bytes() != template
    boot_log = (out / "bootstrap" / "qemu.log").read_text()
    final_log = (out / "final" / "qemu.log").read_text()
    assert "VARS.fd" not in "".join(line for line in boot_log.splitlines() if "uploaded" in line)
    # The final boot uploaded the kept NVRAM (not a fresh template) as its VARS volume.
    assert re.search(rf"uploaded {re.escape(str(kept))} \({len(template)} bytes\) as volume h2k-\w+-VARS\.fd", final_log), final_log
    for phase in ("bootstrap", "final"):
        live = ET.fromstring((out / phase / "domain.live.xml").read_text())
        assert live.findtext("os/nvram").startswith("/var/lib/libvirt/images/h2k/h2k-")
        assert live.find("os/nvram").get("template") == ovmf.vars_template  # the host's own template
    boot_xml = (out / "bootstrap" / "domain.xml").read_text()
    final_xml = (out / "final" / "domain.xml").read_text()
    assert 'bus="sata"' in boot_xml and 'type="e1000e"' in boot_xml
    assert 'bus="virtio"' in final_xml and 'type="virtio"' in final_xml
    # Both phases booted one disk volume, uploaded once before them (neither phase uploaded a disk) ...
    disks = {phase: ET.fromstring((out / phase / "domain.live.xml").read_text())
             .find("devices/disk[@device='disk']/source").get("volume") for phase in ("bootstrap", "final")}
    assert disks["bootstrap"] == disks["final"], disks
    for log in (boot_log, final_log):
        assert f"disk: volume {disks['final']} of the two-phase run" in log
        assert not re.search(r"uploaded .* as volume h2k-\w+-disk", log), log
    # ... so the final phase counts the boot the bootstrap phase wrote on it.
    counts = {phase: printed_counts(out / phase / "serial.log") for phase in ("bootstrap", "final")}
    assert counts == {"bootstrap": {"1"}, "final": {"2"}}, counts
    # The image itself was not written: a plain boot of it after the run counts 1 again, and
    # qemu-img (not the guest) reads the counter it was built with.
    plain, _ = results["boots"]["bios-pass"]
    assert plain.verdict == "passed", plain.reason
    assert printed_counts(results["root"] / "bios-pass" / "serial.log") == {"1"}
    assert counter_line(tinyguest.disk_image("pass")) == "H2K-BOOT-COUNT 0"


def test_same_verdict_as_direct_backend_side_by_side(results) -> None:
    lv, _ = results["boots"]["bios-panic"]
    qd, _ = results["boots"]["bios-panic-direct"]
    assert qd.backend == "qemu" and lv.backend == "libvirt"
    assert (lv.verdict, lv.signal, lv.stop_code) == (qd.verdict, qd.signal, qd.stop_code)
    assert lv.reason.split(";")[0] == qd.reason.split(";")[0]


def test_nothing_left_behind(results, libvirt_host) -> None:
    assert_nothing_on_the_host(libvirt_host)
    assert os.listdir(results["private_tmp"]) == []  # flattened disks, agent sockets all gone
    for cid, (res, secs) in results["boots"].items():
        if res.backend == "libvirt":
            # The lab's own overhead (upload, create paused, console, resume; teardown) is
            # measured for every boot; a few seconds on a quiet host, a starved host stretches it.
            assert 0 < res.timings["lab_start"] < 60 and 0 < res.timings["teardown"] < 60, (cid, res.timings)


def qemu_process_of(host: LibvirtDaemons, name: str) -> int:
    """The pid of the host's QEMU running domain ``name`` (from libvirt's pidfile on the host)."""
    pid = int(host.host_path(f"/run/libvirt/qemu/{name}.pid").read_text())
    assert f"guest={name},".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_boot_leaves_no_domain_or_files(libvirt_host, tmp_path, signum) -> None:
    """`h2k boot --backend libvirt --connect URI` interrupted mid-boot: its domain is destroyed, its
    volumes and temp files removed, exit 130. While it runs, the kernel says who runs QEMU."""
    from lab.backend_libvirt import ensure_event_loop

    ensure_event_loop()
    conn = libvirt.open(libvirt_host.uri)
    resumed = threading.Event()
    seen: list[str] = []

    def on_life(c, dom, event, detail, opaque):
        if dom.name().startswith("h2k-") and event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
            seen.append(dom.name())
            resumed.set()

    cb = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_life, None)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    kernel, _ = tinyguest.host_kernel()
    argv = [sys.executable, "-m", "h2k", "boot", "--os", "linux", "--kernel", str(kernel),
            "--initrd", str(tinyguest.initramfs()), "--append", tinyguest.append_for("hang"),
            "--backend", "libvirt", "--connect", libvirt_host.uri, "--timeout", "300", "--outdir", str(tmp_path / "out")]
    proc = subprocess.Popen(argv, cwd=str(ROOT), env={**os.environ, "TMPDIR": str(private_tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert resumed.wait(timeout=120), "the lab's domain never started running"
        assert os.listdir(private_tmp), "the boot's temp dir should exist while it runs"
        # Not root: the host's QEMU user, by the kernel's account of the process.
        status = Path(f"/proc/{qemu_process_of(libvirt_host, seen[0])}/status").read_text()
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
        assert set(map(int, uids)) == {QEMU_USER.pw_uid}, status
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        conn.domainEventDeregisterAny(cb)
    names = [d.name() for d in conn.listAllDomains()]
    conn.close()
    assert seen[0] not in names  # destroyed
    assert os.listdir(private_tmp) == []  # agent bridge socket, temp dir: gone
    assert_nothing_on_the_host(libvirt_host)  # kernel and initramfs volumes deleted
    name = signal.Signals(signum).name
    assert (proc.returncode, err.strip().splitlines()) == (
        128 + signum, [f"h2k: interrupted ({name}); temporary files removed"]), (proc.returncode, err)


def host_firmware(secure: bool) -> str:
    """The OVMF build the host's own firmware descriptors offer first (what libvirt must pick)."""
    for f in sorted(Path("/usr/share/qemu/firmware").glob("*.json")):
        desc = json.loads(f.read_text())
        feats = set(desc.get("features", []))
        if "uefi" in desc["interface-types"] and ("secure-boot" in feats) == secure \
                and (not secure or "enrolled-keys" in feats):
            return Path(desc["mapping"]["executable"]["filename"]).name
    raise AssertionError("no OVMF firmware descriptor on this host")


# (profile, what QEMU's command line must then contain) -- the machines no tiny guest boots.
STARTS = [
    ("win11-bootstrap", lambda iso: domain.bootstrap_profile({"os": "windows", "firmware": "uefi", "build": 22631},
                                                             virtio_iso=iso, memory_mb=512),
     ["smm=on", "driver=cfi.pflash01,property=secure,value=on", host_firmware(secure=True), "tpm-crb",
      "-tpmdev emulator", "hv-crash", "hv-relaxed=on", '"driver":"ide-hd"', '"driver":"ide-cd"', '"driver":"e1000e"',
      '"driver":"pvpanic","ioport":1285', "org.qemu.guest_agent.0"]),
    ("win-ide-bootstrap", lambda iso: domain.bootstrap_profile({"os": "windows", "firmware": "bios"}, bus="ide",
                                                               virtio_iso=iso, memory_mb=512),
     ["pc-i440fx", '"driver":"ide-hd"', '"driver":"ide-cd"', "hv-crash", '"driver":"e1000e"']),
    ("win-scsi-final", lambda iso: domain.final_profile({"os": "windows", "firmware": "uefi"}, bus="virtio-scsi",
                                                        memory_mb=512),
     ["pc-q35", host_firmware(secure=False), '"driver":"virtio-scsi-pci"', '"driver":"scsi-hd"',
      '"driver":"virtio-net-pci"', "hv-crash"]),
]


@pytest.mark.parametrize("name,make,expected", STARTS, ids=[s[0] for s in STARTS])
def test_libvirt_starts_machines_no_tiny_guest_boots(libvirt_host, tmp_path, name, make, expected) -> None:
    """Secure Boot + TPM, IDE on i440fx, virtio-scsi, Hyper-V: the backend uploads the disk and ISO,
    the host accepts the XML and starts QEMU (paused, never run) with the devices the direct
    backend would use. The oracle is the host's own QEMU log (read from its directory)."""
    from h2k import accel
    from lab.backend_libvirt import LibvirtBoot, LibvirtBootOptions

    disk, iso = tmp_path / "d.qcow2", tmp_path / "virtio-win.iso"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    iso.write_bytes(b"\0" * 2048 * 16)
    prof = make(str(iso))
    b = LibvirtBoot(disk, prof, LibvirtBootOptions(timeout=60, outdir=tmp_path / "out", connect=libvirt_host.uri))
    try:
        dom = b.create_paused(accel.AccelDecision("tcg", "test", "env"))
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        cmdline = (libvirt_host.qemu_log_dir / f"{b.tag}.log").read_text()
        if prof.uefi:  # the host made the NVRAM volume from its template
            assert (libvirt_host.storage_dir / "h2k" / f"{b.tag}-VARS.fd").stat().st_size > 0
    finally:
        b.teardown()
    missing = [e for e in expected if e not in cmdline]
    assert not missing, f"{name}: not on QEMU's command line: {missing}"
    assert_host_side_only(tmp_path / "out")
    assert_nothing_on_the_host(libvirt_host)


def test_two_phase_interrupted_between_phases_leaves_no_disk_volume(libvirt_host, tmp_path, monkeypatch) -> None:
    """The run's disk volume, uploaded once (the host's pool holds it), is
    what both phases get, and it is deleted when the run is interrupted after the bootstrap phase.
    The phases themselves are stand-ins: the real two-phase boots are in the module fixture."""
    from lab import boot as lab_boot
    from lab.verdict import BootResult

    image = tinyguest.disk_image("pass")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    conn = libvirt.open(libvirt_host.uri)
    seen = []

    def phase(image_arg, profile, *, phase_disk, **kw):
        # The host's own view: the volume in its pool, a file in its pool directory of the image's size.
        pool = conn.storagePoolLookupByName(phase_disk.pool)
        pool.refresh(0)
        pool.storageVolLookupByName(phase_disk.volume)
        assert (libvirt_host.storage_dir / phase_disk.pool / phase_disk.volume).stat().st_size == image.stat().st_size
        seen.append(phase_disk.volume)
        if profile.stage == "bootstrap":
            return BootResult("passed", "stand-in bootstrap phase", profile=profile.to_dict(), backend="libvirt")
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, through interrupt_guard) in the final phase

    monkeypatch.setattr(lab_boot, "_boot", phase)
    meta = {"os": "linux", "firmware": "bios", "name": "tiny", "memory_mb": 512, "cpus": 1}
    try:
        with pytest.raises(KeyboardInterrupt):
            lab_boot.boot_two_phase(image, domain.bootstrap_profile(meta), domain.final_profile(meta), timeout=60,
                                    outdir=tmp_path / "out", backend="libvirt", connect=libvirt_host.uri)
    finally:
        conn.close()
    assert len(seen) == 2 and seen[0] == seen[1]
    assert_nothing_on_the_host(libvirt_host)
    assert list(private_tmp.iterdir()) == []
