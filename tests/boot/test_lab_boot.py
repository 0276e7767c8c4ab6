"""Real boots of the lab's tiny guests under QEMU (direct backend), one per outcome,
on SeaBIOS and OVMF: passed with network (agent + gateway ping), a panic caught
through GUEST_PANICKED (pvpanic), a reboot loop (SHUTDOWN guest-reset), a timeout,
a silent guest, no bootable device, Secure Boot refusing an unsigned loader, a
two-phase boot that keeps one NVRAM and what the bootstrap phase wrote on the disk, and a
guest that prints nothing passed by its agent alone.

The boots run five at a time in one module fixture, once per test run even under
xdist (a file lock): on 2 shared cores that keeps the wall time near the CPU time the guests need (tiny guests reach their marker
in ~10-25 s under TCG).
"""

from __future__ import annotations

import fcntl
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lab import tinyguest
from lab.boot import boot, boot_two_phase
from lab.verdict import BootResult, Expect
from tinyguest_checks import counter_line, printed_counts

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("lab-boot")]

LONG = 300  # for boots that end on their own (passes, panics); under load TCG is slow
SHORT = 20  # for boots that must end in a timeout
HANG = 45

NET = Expect(require_agent=True, require_network=True)
TWO_MACS = ["52:54:00:4b:00:01", "52:54:00:4b:00:02"]

# id: (firmware, mode or None for the empty disk, how: kernel|disk|empty, profile overrides, expect, timeout)
CASES = {
    "bios-pass-net": ("bios", "pass", "kernel", {}, NET, LONG),
    # With the Hyper-V enlightenments a Windows profile gets (QEMU must start with them under TCG too).
    "bios-panic": ("bios", "panic", "kernel", {"hyperv": True}, Expect(), LONG),
    "bios-reboot": ("bios", "reboot", "kernel", {}, Expect(), LONG),
    # Boots, prints, then idles (cheap under TCG) until the deadline.
    "bios-timeout": ("bios", "hang", "kernel", {}, Expect(), HANG),
    "bios-silent": ("bios", "silent", "kernel", {}, Expect(), SHORT),
    "bios-no-bootable": ("bios", None, "empty", {}, Expect(), LONG),
    # Two NICs, as a source VM with two MACs gets: one slirp network each, MACs in order.
    "bios-disk-sata-e1000e": ("bios", "pass", "disk", {"disk_bus": "sata", "nic_model": "e1000e", "macs": TWO_MACS},
                              NET, LONG),
    "uefi-pass-net": ("uefi", "pass", "kernel", {}, NET, LONG),
    "uefi-panic": ("uefi", "panic", "kernel", {}, Expect(), LONG),
    "uefi-reboot": ("uefi", "reboot", "kernel", {}, Expect(), LONG),
    "uefi-timeout": ("uefi", "hang", "kernel", {}, Expect(), HANG),
    "uefi-silent": ("uefi", "silent", "kernel", {}, Expect(), SHORT),
    "uefi-no-bootable": ("uefi", None, "empty", {}, Expect(), LONG),
    "uefi-disk-virtio-scsi": ("uefi", "pass", "disk", {"disk_bus": "virtio-scsi"}, NET, LONG),
    "secureboot-tpm-denied": ("uefi-secureboot", "pass", "disk", {"tpm": True}, Expect(), LONG),
    # No agent required: the clean shutdown after the pass goes through ACPI system_powerdown.
    "bios-acpi-shutdown": ("bios", "pass", "kernel", {}, Expect(), LONG),
    # A guest that prints nothing anywhere, scored as any Linux: only its agent can pass it.
    "bios-quiet-agent": ("bios", "quiet", "kernel", {}, Expect.for_os("linux"), LONG),
}
SHUTDOWN_ON_PASS = {"bios-acpi-shutdown"}
# Booted right after the two-phase run, in the same worker: a plain boot of the same image
# must count its boot as the first again (the two-phase run never wrote the image).
AFTER_TWO_PHASE = "uefi-disk-virtio-scsi"


def _run_case(case_id: str, outroot: Path):
    fw, mode, how, over, expect, timeout = CASES[case_id]
    if how == "kernel":
        profile, image = tinyguest.kernel_profile(mode, firmware=fw, **over), None
    elif how == "disk":
        profile, image = tinyguest.disk_profile(fw, **over), tinyguest.disk_image(mode)
    else:
        profile, image = tinyguest.disk_profile(fw, **over), tinyguest.empty_disk()
    return boot(image, profile, timeout=timeout, outdir=outroot / case_id, expect=expect,
                shutdown_on_pass=case_id in SHUTDOWN_ON_PASS)


def _run_two_phase_then_plain(outroot: Path):
    image = tinyguest.disk_image("pass")
    first = tinyguest.disk_profile("uefi", disk_bus="sata", nic_model="e1000e", stage="bootstrap")
    final = tinyguest.disk_profile("uefi", disk_bus="virtio-blk", nic_model="virtio-net")
    two = boot_two_phase(image, first, final, timeout=LONG, outdir=outroot / "two-phase", expect=NET)
    return two, _run_case(AFTER_TWO_PHASE, outroot)


def _run_all(outroot: Path) -> dict:
    tinyguest.initramfs(), tinyguest.disk_image("pass"), tinyguest.empty_disk()  # build once, up front
    images = {str(p): p.stat().st_mtime_ns for p in (tinyguest.disk_image("pass"), tinyguest.empty_disk())}
    with ThreadPoolExecutor(max_workers=5) as pool:
        chain = pool.submit(_run_two_phase_then_plain, outroot)  # the longest: start it first
        futs = {cid: pool.submit(_run_case, cid, outroot) for cid in CASES if cid != AFTER_TWO_PHASE}
        out = {cid: f.result().to_dict() for cid, f in futs.items()}
        two, plain = chain.result()
        out.update({"two-phase": two.to_dict(), AFTER_TWO_PHASE: plain.to_dict()})
    return {"results": out, "images": images}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # One set of boots per test run, shared by every xdist worker that gets a test of this
    # module (a file lock; the first worker boots, the others read its results). This does
    # not rely on --dist loadgroup, which pytest 9 + xdist 3.8 silently ignore.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    outroot = shared / "lab-boots"
    outroot.mkdir(exist_ok=True)
    done = outroot / "results.json"
    with open(shared / ".lab-boots.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(_run_all(outroot)))
            tmp.replace(done)
        data = json.loads(done.read_text())
    out = {cid: BootResult.from_dict(d) for cid, d in data["results"].items()}
    out["_images"] = {Path(p): m for p, m in data["images"].items()}
    return out


def _qmp_events(result) -> list[dict]:
    path = Path(result.artifacts["qmp.jsonl"])
    return [r["msg"] for r in map(json.loads, path.read_text().splitlines()) if "event" in r["msg"]]


def _evidence(result):
    for name in ("serial.log", "qmp.jsonl", "qemu.log", "screen.png", "verdict.json"):
        assert name in result.artifacts, f"{name} missing: {result.artifacts}"
        assert Path(result.artifacts[name]).exists()
    assert Path(result.artifacts["screen.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads(Path(result.artifacts["verdict.json"]).read_text())
    assert on_disk["verdict"] == result.verdict and on_disk["reason"] == result.reason


@pytest.mark.parametrize("case", ["bios-pass-net", "uefi-pass-net", "bios-disk-sata-e1000e", "uefi-disk-virtio-scsi"])
def test_passed_with_network(results, case):
    r = results[case]
    assert r.verdict == "passed", r.reason
    assert "H2K-BOOT-OK" in r.reason and "answers ping" in r.reason
    assert r.agent["osinfo"]["id"] == "h2k-tinyguest"
    assert any(a.startswith("10.0.2.") for addrs in r.agent["ipv4"].values() for a in addrs)
    assert r.agent["gateway_ping"]["exitcode"] == 0
    _evidence(r)
    assert "H2K-BOOT-OK" in Path(r.artifacts["serial.log"]).read_text(errors="replace")
    if CASES[case][2] == "disk":  # each plain boot writes its own overlay: the image's first boot
        assert printed_counts(r.artifacts["serial.log"]) == {"1"}


def test_every_kept_mac_is_a_nic_the_guest_sees(results):
    r = results["bios-disk-sata-e1000e"]
    assert r.verdict == "passed", r.reason
    seen = [i.get("hardware-address") for i in r.agent["interfaces"] if i.get("name") != "lo"]
    assert sorted(seen) == TWO_MACS, r.agent["interfaces"]


@pytest.mark.parametrize("case", ["bios-panic", "uefi-panic"])
def test_panic_caught_through_guest_panicked(results, case):
    r = results[case]
    assert r.verdict == "failed" and r.signal == "qmp-panic", r.reason
    assert "sysrq triggered crash" in r.reason  # the console line corroborates
    events = [e["event"] for e in _qmp_events(r)]
    assert "GUEST_PANICKED" in events
    assert r.timings["signal_to_verdict"] < 1.0
    _evidence(r)


@pytest.mark.parametrize("case", ["bios-reboot", "uefi-reboot"])
def test_reboot_loop(results, case):
    r = results[case]
    assert r.verdict == "failed" and r.signal == "qmp-reset" and "reboot loop" in r.reason
    assert any(e["event"] == "SHUTDOWN" and e["data"]["reason"] == "guest-reset" for e in _qmp_events(r))


@pytest.mark.parametrize("case", ["bios-timeout", "uefi-timeout"])
def test_timeout(results, case):
    r = results[case]
    assert r.verdict == "timeout" and r.signal == "deadline"
    assert HANG <= r.seconds < HANG + 15
    log = Path(r.artifacts["serial.log"]).read_text(errors="replace")
    # How far the guest gets in 45 s depends on the host's load; it never prints success.
    assert "H2K-BOOT-OK" not in log
    _evidence(r)


@pytest.mark.parametrize("case", ["bios-silent", "uefi-silent"])
def test_silent_guest_times_out(results, case):
    r = results[case]
    assert r.verdict == "timeout"
    log = Path(r.artifacts["serial.log"]).read_text(errors="replace")
    assert "h2k-tinyguest" not in log and "Linux version" not in log
    if case.startswith("bios"):
        assert log == ""  # SeaBIOS does not write to COM1 either
    _evidence(r)


@pytest.mark.parametrize("case,budget", [("bios-no-bootable", 30), ("uefi-no-bootable", 90)])
def test_no_bootable_device_is_quick(results, case, budget):
    r = results[case]
    assert r.verdict == "failed" and r.reason.startswith("no bootable device"), r.reason
    assert r.seconds < budget
    if case.startswith("bios"):
        assert r.signal == "firmware-failure"  # SeaBIOS says it on the debug port, not COM1
        assert "No bootable device" in Path(r.artifacts["firmware.log"]).read_text(errors="replace")


def test_secure_boot_refuses_unsigned_loader_with_tpm(results):
    r = results["secureboot-tpm-denied"]
    assert r.verdict == "failed" and r.reason.startswith("secure-boot-denied"), r.reason
    assert r.profile["tpm"] is True


def test_two_phase_keeps_one_nvram(results, tmp_path):
    r = results["two-phase"]
    assert r.verdict == "passed", r.reason
    assert [p["phase"] for p in r.phases] == ["bootstrap", "final"]
    boot_phase, final_phase = r.phases
    assert "shut down cleanly (guest agent guest-shutdown, SHUTDOWN reason guest-shutdown)" in boot_phase["reason"]
    assert boot_phase["profile"]["disk_bus"] == "sata" and final_phase["profile"]["disk_bus"] == "virtio-blk"
    vars_file = Path(r.artifacts["OVMF_VARS.fd"])
    assert vars_file.exists()
    # Both phases ran with the same NVRAM file.
    for phase in ("bootstrap", "final"):
        qlog = Path(r.artifacts[f"{phase}/qemu.log"]).read_text()
        assert f"unit=1,file={vars_file}" in qlog
    # ... and the same disk: the final phase counts the boot the bootstrap phase wrote on it.
    counts = {phase: printed_counts(r.artifacts[f"{phase}/serial.log"]) for phase in ("bootstrap", "final")}
    assert counts == {"bootstrap": {"1"}, "final": {"2"}}, counts
    # The image itself was not written: qemu-img reads the counter it was built with, and a
    # plain boot of it after the two-phase run counts 1 again.
    assert counter_line(tinyguest.disk_image("pass")) == "H2K-BOOT-COUNT 0"
    after = results[AFTER_TWO_PHASE]
    assert after.verdict == "passed", after.reason
    assert printed_counts(after.artifacts["serial.log"]) == {"1"}


def test_clean_shutdown_through_acpi(results):
    r = results["bios-acpi-shutdown"]
    assert r.verdict == "passed", r.reason
    assert "shut down cleanly (ACPI system_powerdown, SHUTDOWN reason guest-shutdown)" in r.reason
    assert any(e["event"] == "SHUTDOWN" and e["data"]["reason"] == "guest-shutdown" for e in _qmp_events(r))


def test_the_agent_alone_passes_a_guest_that_prints_nothing(results):
    r = results["bios-quiet-agent"]
    assert r.verdict == "passed" and r.evidence == ["agent"], r.reason
    assert r.reason == "agent up (h2k tiny guest (busybox))"
    assert Path(r.artifacts["serial.log"]).read_bytes() == b""  # COM1 stayed silent
    _evidence(r)


def test_images_never_written(results):
    for path, mtime in results["_images"].items():
        assert path.stat().st_mtime_ns == mtime
