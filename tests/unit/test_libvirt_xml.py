"""libvirt domain XML: every firmware x bus x NIC x stage validates with the real virt-xml-validate."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from h2k import libvirt_xml as lx
from h2k.profile import MachineProfile

VALIDATE = shutil.which("virt-xml-validate")
needs_validator = pytest.mark.skipif(VALIDATE is None, reason="virt-xml-validate (libvirt-clients) not installed")

FIRMWARES = ("bios", "uefi", "uefi-secureboot")
BUSES = ("sata", "ide", "virtio-blk", "virtio-scsi")
NICS = ("virtio-net", "e1000e", "none")
STAGES = ("bootstrap", "final")
# Secure Boot needs SMM, i.e. q35; IDE needs i440fx: that pair cannot exist (tested below).
COMBOS = [c for c in itertools.product(FIRMWARES, BUSES, NICS, STAGES) if c[:2] != ("uefi-secureboot", "ide")]

FILES = lx.DomainFiles(
    disk="/var/tmp/h2k/disk.qcow2",
    serial_socket="/run/h2k/boot1/console.sock",
    serial_log="/var/tmp/h2k/boot1/serial.log",
    agent_socket="/run/h2k/boot1/agent.sock",
    nvram="/var/tmp/h2k/boot1/VARS.fd",
)


def profile_for(firmware: str, bus: str, nic: str, stage: str) -> MachineProfile:
    windows = firmware != "bios" or bus != "virtio-blk"  # mix Windows- and Linux-like profiles
    return MachineProfile(
        name=f"t-{firmware}-{bus}-{nic}-{stage}",
        stage=stage,
        firmware=firmware,
        disk_bus=bus,
        nic_model=nic,
        # the bootstrap machines carry two NICs (a source VM with two), the final ones one
        macs=([] if nic == "none" else ["52:54:00:ab:cd:ef", "52:54:00:ab:cd:f0"][: 2 if stage == "bootstrap" else 1]),
        memory_mb=2048,
        cpus=2,
        cdroms=["/var/tmp/virtio-win.iso"] if stage == "bootstrap" else [],
        hyperv=windows,
        tpm=firmware == "uefi-secureboot",
    )


def validate(tmp_path: Path, xml: str) -> None:
    f = tmp_path / "domain.xml"
    f.write_text(xml)
    r = subprocess.run([VALIDATE, str(f), "domain"], capture_output=True, text=True)
    assert r.returncode == 0, f"virt-xml-validate rejected:\n{r.stderr}\n{xml}"


@needs_validator
@pytest.mark.parametrize("firmware,bus,nic,stage", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination_validates(tmp_path: Path, firmware: str, bus: str, nic: str, stage: str) -> None:
    p = profile_for(firmware, bus, nic, stage)
    xml = lx.domain_xml(p, FILES, lx.XmlOptions(domain_type="qemu", lab=stage == "bootstrap"))
    validate(tmp_path, xml)
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"
    assert root.findtext("name") == p.name
    assert root.find("os/type").get("machine") == ("pc" if bus == "ide" else "q35")

    # Firmware.
    loader = root.find("os/loader")
    if firmware == "bios":
        assert loader is None and root.find("os/nvram") is None
        assert root.find("os/bios").get("useserial") == "yes"
    else:
        assert loader.get("type") == "pflash" and loader.get("readonly") == "yes"
        nvram = root.find("os/nvram")
        assert nvram.text == FILES.nvram and nvram.get("template")
        secure = firmware == "uefi-secureboot"
        assert (loader.get("secure") == "yes") == secure
        assert (root.find("features/smm") is not None) == secure
        assert ("secboot" in loader.text) == secure
        # no network-boot fall-back in OVMF
        entries = {e.get("name"): e.text for e in root.findall("sysinfo[@type='fwcfg']/entry")}
        assert entries["opt/org.tianocore/IPv4PXESupport"] == "n"

    # Disk on its bus, first in the boot order.
    disk = root.find("devices/disk[@device='disk']")
    want_bus = {"sata": "sata", "ide": "ide", "virtio-blk": "virtio", "virtio-scsi": "scsi"}[bus]
    assert disk.find("target").get("bus") == want_bus
    assert disk.find("source").get("file") == FILES.disk
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("boot").get("order") == "1"
    scsi = root.findall("devices/controller[@type='scsi']")
    assert [c.get("model") for c in scsi] == (["virtio-scsi"] if bus == "virtio-scsi" else [])

    # CD-ROM (the driver ISO) only at bootstrap, on the machine's ATA bus, not clashing with the disk.
    cds = root.findall("devices/disk[@device='cdrom']")
    if stage == "bootstrap":
        assert len(cds) == 1 and cds[0].find("readonly") is not None
        assert cds[0].find("target").get("bus") == ("ide" if bus == "ide" else "sata")
        assert cds[0].find("target").get("dev") != disk.find("target").get("dev")
    else:
        assert cds == []

    # NIC: user-mode networking only, model, MAC kept, no option ROM.
    nics = root.findall("devices/interface")
    if nic == "none":
        assert nics == []
    else:
        assert [i.find("mac").get("address") for i in nics] == p.macs
        for iface in nics:
            assert iface.get("type") == "user"
            assert iface.find("model").get("type") == {"virtio-net": "virtio", "e1000e": "e1000e"}[nic]
            assert iface.find("rom").get("enabled") == "no"

    # Console, agent, panic devices, TPM, Hyper-V.
    serial = root.find("devices/serial")
    assert serial.get("type") == "unix"
    assert serial.find("source").get("path") == FILES.serial_socket
    assert serial.find("log").get("file") == FILES.serial_log
    chan = root.find("devices/channel")
    assert chan.find("target").get("name") == "org.qemu.guest_agent.0"
    assert chan.find("source").get("path") == FILES.agent_socket
    panics = {pn.get("model"): pn for pn in root.findall("devices/panic")}
    assert panics["isa"].find("address").get("iobase") == "0x505"
    assert ("hyperv" in panics) == p.hyperv
    hv = root.find("features/hyperv")
    if p.hyperv:
        # under TCG (domain type qemu) QEMU refuses hv-vpindex, which synic and stimer need
        assert {c.tag for c in hv} == {"relaxed", "vapic", "spinlocks", "runtime", "reset", "frequencies"}
        assert root.find("clock").get("offset") == "localtime"
    else:
        assert hv is None
    tpm = root.find("devices/tpm")
    assert (tpm is not None) == p.tpm
    if tpm is not None:
        assert tpm.find("backend").get("type") == "emulator" and tpm.find("backend").get("version") == "2.0"

    # Lifecycle: the lab stops on reboot and keeps a crashed guest for evidence.
    lab = stage == "bootstrap"
    assert root.findtext("on_reboot") == ("destroy" if lab else "restart")
    assert root.findtext("on_crash") == ("preserve" if lab else "restart")
    assert root.find("pm/suspend-to-mem").get("enabled") == "no"


def test_secureboot_on_ide_is_impossible() -> None:
    with pytest.raises(ValueError, match="Secure Boot"):
        MachineProfile(name="x", firmware="uefi-secureboot", disk_bus="ide")


@needs_validator
def test_direct_kernel_boot_and_kvm(tmp_path: Path) -> None:
    p = MachineProfile(
        name="tiny", firmware="uefi", disk_bus="virtio-blk", kernel="/boot/vmlinuz", initrd="/tmp/i.cpio.gz",
        append="console=ttyS0 panic=-1", hyperv=False,
    )
    xml = lx.domain_xml(p, lx.DomainFiles(disk="/tmp/d.raw", disk_format="raw"), lx.XmlOptions(domain_type="kvm", lab=True))
    validate(tmp_path, xml)
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.findtext("os/initrd") == "/tmp/i.cpio.gz"
    assert root.findtext("os/cmdline") == "console=ttyS0 panic=-1"
    # kernel boot: no per-device boot order (libvirt refuses it together with <kernel>? no: firmware just skips it)
    assert root.find("devices/disk/boot") is None
    # no socket given: the console falls back to a pty, the agent socket is left to libvirt
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/channel/source").get("path") is None
    assert root.find("devices/disk/driver").get("type") == "raw"


@needs_validator
def test_kvm_gets_all_hyperv_enlightenments(tmp_path: Path) -> None:
    xml = lx.domain_xml(MachineProfile(name="w", hyperv=True), FILES, lx.XmlOptions(domain_type="kvm"))
    validate(tmp_path, xml)
    root = ET.fromstring(xml)
    tags = {c.tag for c in root.find("features/hyperv")}
    assert tags == {"relaxed", "vapic", "spinlocks", "vpindex", "runtime", "synic", "stimer", "reset", "frequencies"}
    assert root.find("features/hyperv/spinlocks").get("retries") == "8191"
    assert root.find("devices/panic[@model='hyperv']") is not None
    assert root.find("clock/timer[@name='hypervclock']").get("present") == "yes"


@needs_validator
def test_other_buses_and_nics_validate(tmp_path: Path) -> None:
    for bus, nic in (("scsi-lsi", "vmxnet3"), ("pvscsi", "e1000"), ("sata", "rtl8139")):
        p = MachineProfile(name=f"src-{bus}", firmware="bios", disk_bus=bus, nic_model=nic, cdroms=["/a.iso", "/b.iso"])
        xml = lx.domain_xml(p, FILES, lx.XmlOptions(domain_type="qemu"))
        validate(tmp_path, xml)
        root = ET.fromstring(xml)
        targets = [d.find("target").get("dev") for d in root.findall("devices/disk")]
        assert len(set(targets)) == len(targets) == 3


def test_domain_type_comes_from_accel(monkeypatch: pytest.MonkeyPatch) -> None:
    from h2k import accel

    monkeypatch.setattr(accel, "_decided", accel.AccelDecision("tcg", "test", "env"))
    root = ET.fromstring(lx.domain_xml(MachineProfile(name="a"), FILES))
    assert root.get("type") == "qemu" and root.find("cpu").get("mode") == "maximum"
    monkeypatch.setattr(accel, "_decided", accel.AccelDecision("kvm", "test", "env"))
    assert ET.fromstring(lx.domain_xml(MachineProfile(name="a"), FILES)).get("type") == "kvm"


def test_disk_format_sniffed(tmp_path: Path) -> None:
    q = tmp_path / "a.img"
    q.write_bytes(b"QFI\xfb" + b"\0" * 60)
    r = tmp_path / "b.qcow2"
    r.write_bytes(b"\0" * 64)
    assert lx.disk_format_of(str(q)) == "qcow2"
    assert lx.disk_format_of(str(r)) == "raw"  # content wins over the name
    assert lx.disk_format_of(str(tmp_path / "missing.qcow2")) == "qcow2"


def test_ovmf_pairs_match() -> None:
    plain, secure = lx.find_ovmf(False), lx.find_ovmf(True)
    assert "secboot" not in plain.code and "secboot" in secure.code
    if Path(secure.code).exists():
        assert Path(secure.vars_template).exists()


# What the lab's libvirt backend sends to a host that shares no files with it (lab/backend_libvirt.py).
HOST_FILES = lx.DomainFiles(disk="h2k-0123-disk.qcow2", disk_pool="h2k", nvram="/var/lib/libvirt/images/h2k/h2k-0123-VARS.fd")


@needs_validator
@pytest.mark.parametrize("firmware", FIRMWARES)
def test_host_side_xml_names_only_the_pool_and_lets_the_host_pick_its_firmware(tmp_path: Path, firmware: str) -> None:
    p = profile_for(firmware, "sata", "e1000e", "bootstrap")
    xml = lx.domain_xml(p, HOST_FILES, lx.XmlOptions(domain_type="qemu", lab=True, firmware_autoselect=True))
    validate(tmp_path, xml)
    root = ET.fromstring(xml)
    disk = root.find("devices/disk[@device='disk']")
    assert disk.get("type") == "volume"
    assert disk.find("source").attrib == {"pool": "h2k", "volume": "h2k-0123-disk.qcow2"}
    assert root.find("devices/serial").get("type") == "pty" and root.find("devices/serial/log") is None
    assert root.find("devices/channel/source").get("path") is None  # the host names the agent socket
    assert root.find("seclabel") is None  # QEMU runs as the host's QEMU user, not forced to root
    os_el = root.find("os")
    if firmware == "bios":
        assert os_el.get("firmware") is None and os_el.find("nvram") is None
        return
    assert os_el.get("firmware") == "efi" and os_el.find("loader") is None  # the host's own OVMF
    assert os_el.find("nvram").text == HOST_FILES.nvram and os_el.find("nvram").get("template") is None
    features = {f.get("name"): f.get("enabled") for f in os_el.findall("firmware/feature")}
    if firmware == "uefi-secureboot":
        assert features == {"secure-boot": "yes", "enrolled-keys": "yes"}
        assert root.find("features/smm").get("state") == "on"
    else:
        assert features == {"secure-boot": "no"}
