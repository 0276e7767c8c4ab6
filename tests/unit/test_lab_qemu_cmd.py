"""Profile -> QEMU argv (asserted offline; tests/boot starts QEMU with these argv for real)."""

from __future__ import annotations

from pathlib import Path

import pytest

import json

from h2k.accel import AccelDecision
from h2k.image import DiskImage
from h2k.inputs.formats import DiskInfo
from h2k.profile import MachineProfile
from lab import confine, firmware, qemu_cmd

TCG = AccelDecision("tcg", "test", "env")
KVM = AccelDecision("kvm", "test", "env")
FDS = qemu_cmd.SocketFds(qmp=10, console=11, debugcon=12, agent=13)


def layer(path, fmt, backing=None, files=None):
    return DiskInfo(path=path, format=fmt, virtual_size=1 << 30, backing=backing, files=files or [path])


DISK = DiskImage("/tmp/d.qcow2", (layer("/tmp/d.qcow2", "qcow2"),))


def argv(profile, disk=DISK, accel=TCG, **kw):
    return qemu_cmd.build(profile, accel=accel, name="h2k-test", fds=FDS, serial_log=Path("/o/serial.log"),
                          firmware_log=Path("/o/firmware.log"), disk=disk, **kw).argv


def opt_values(a, flag):
    return [a[i + 1] for i, x in enumerate(a) if x == flag]


def test_evidence_actions_sockets_and_accel():
    a = argv(MachineProfile("w", hyperv=True))
    assert opt_values(a, "-action") == ["panic=pause", "reboot=shutdown", "shutdown=pause"]
    assert "-S" in a and opt_values(a, "-name") == ["h2k-test"]
    assert opt_values(a, "-accel") == ["tcg,thread=multi"]
    cpu = opt_values(a, "-cpu")[0]
    assert cpu.startswith("max,") and "hv-crash" in cpu
    assert "socket,id=qmp,fd=10,server=on,wait=off" in a
    assert any(x.startswith("socket,id=com1,fd=11") and "logfile=/o/serial.log" in x for x in a)
    assert "isa-debugcon,iobase=0x402,chardev=fwdbg" in a
    assert any("name=org.qemu.guest_agent.0" in x for x in a)
    assert "pvpanic-pci" in a and "-display" in a
    assert "hv-vpindex" not in cpu  # QEMU 7.2 refuses it under TCG (measured)
    kvm = argv(MachineProfile("w", hyperv=False), accel=KVM)
    assert opt_values(kvm, "-accel") == ["kvm"] and opt_values(kvm, "-cpu") == ["host"]
    kvm_hv = opt_values(argv(MachineProfile("w", hyperv=True), accel=KVM), "-cpu")[0]
    assert kvm_hv.startswith("host,") and "hv-vpindex" in kvm_hv and "hv-synic" in kvm_hv and "hv-crash" in kvm_hv


@pytest.mark.parametrize("bus,expect", [
    ("sata", "ide-hd,drive=disk0,bus=ide.0,bootindex=1"),
    ("virtio-blk", "virtio-blk-pci,drive=disk0,bootindex=1"),
    ("virtio-scsi", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"),
    ("ide", "ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"),
    ("pvscsi", "pvscsi,id=scsi0"),
    ("scsi-lsi", "lsi53c895a,id=scsi0"),
])
def test_disk_buses(bus, expect):
    p = MachineProfile("w", disk_bus=bus)
    a = argv(p)
    assert expect in a
    if bus == "ide":
        assert opt_values(a, "-machine") == ["pc"] and "pvpanic" in a


def test_sata_on_pc_adds_ahci_and_cdroms():
    p = MachineProfile("w", machine_type="pc", disk_bus="sata", cdroms=["/isos/virtio-win.iso"])
    a = argv(p)
    assert "ahci,id=ahci0" in a and "ide-hd,drive=disk0,bus=ahci0.0,bootindex=1" in a
    assert "ide-cd,drive=cd0,bus=ide.1,unit=0" in a
    q = argv(MachineProfile("w", disk_bus="sata", cdroms=["/a.iso", "/b.iso"]))
    assert "ide-cd,drive=cd0,bus=ide.1" in q and "ide-cd,drive=cd1,bus=ide.2" in q


@pytest.mark.parametrize("nic,dev", [("virtio-net", "virtio-net-pci"), ("e1000e", "e1000e"), ("vmxnet3", "vmxnet3")])
def test_nics_are_slirp_restricted_without_option_rom(nic, dev):
    a = argv(MachineProfile("w", nic_model=nic, macs=["52:54:00:12:34:56"]))
    assert opt_values(a, "-netdev") == ["user,id=net0,restrict=on"]
    assert f"{dev},netdev=net0,romfile=,mac=52:54:00:12:34:56" in a
    assert "-netdev" not in argv(MachineProfile("w", nic_model="none"))


def test_one_nic_per_mac_in_order_and_one_without():
    a = argv(MachineProfile("w", macs=["52:54:00:00:00:01", "52-54-00-00-00-0A"]))
    assert opt_values(a, "-netdev") == ["user,id=net0,restrict=on", "user,id=net1,restrict=on"]
    assert [d for d in opt_values(a, "-device") if "netdev=" in d] == [
        "virtio-net-pci,netdev=net0,romfile=,mac=52:54:00:00:00:01",
        "virtio-net-pci,netdev=net1,romfile=,mac=52:54:00:00:00:0a"]
    plain = [d for d in opt_values(argv(MachineProfile("w")), "-device") if "netdev=" in d]
    assert plain == ["virtio-net-pci,netdev=net0,romfile="]  # no MAC known: one NIC, QEMU picks its MAC


@pytest.mark.parametrize("macs,msg", [(["zz"], "six hex bytes"), (["52:54:00:00:00:01", "52-54-00-00-00-01"], "twice")])
def test_bad_macs_refused(macs, msg):
    with pytest.raises(ValueError, match=msg):
        MachineProfile("w", macs=macs)


def test_profile_from_an_older_dict_with_one_mac():
    assert MachineProfile.from_dict({"name": "w", "mac": "52:54:00:00:00:01"}).macs == ["52:54:00:00:00:01"]


def test_uefi_vars_copy_and_no_network_boot(tmp_path):
    fw = firmware.find("uefi")
    vars_path = firmware.prepare_vars(fw, tmp_path)
    assert vars_path.read_bytes() == fw.vars_template.read_bytes() and vars_path.parent == tmp_path
    a = argv(MachineProfile("w", firmware="uefi"), fw=fw, vars_path=vars_path)
    code, nvram = (json.loads(b) for b in opt_values(a, "-blockdev")[:2])
    assert code["node-name"] == "fw-code" and code["read-only"] and code["file"]["filename"] == str(fw.code)
    assert nvram["node-name"] == "fw-vars" and not nvram["read-only"] and nvram["file"]["filename"] == str(vars_path)
    assert opt_values(a, "-machine") == ["q35,pflash0=fw-code,pflash1=fw-vars"]
    assert "name=opt/org.tianocore/IPv4PXESupport,string=n" in a
    # A kept VARS file is reused as is (two-phase boots keep one NVRAM).
    vars_path.write_bytes(b"changed")
    assert firmware.prepare_vars(fw, tmp_path, keep=vars_path).read_bytes() == b"changed"


def test_secure_boot_uses_smm_and_enrolled_vars(tmp_path):
    fw = firmware.find("uefi-secureboot")
    assert "secboot" in fw.code.name and ".ms." in fw.vars_template.name
    a = argv(MachineProfile("w", firmware="uefi-secureboot"), fw=fw, vars_path=tmp_path / "v.fd")
    assert opt_values(a, "-machine") == ["q35,smm=on,pflash0=fw-code,pflash1=fw-vars"]
    assert "driver=cfi.pflash01,property=secure,value=on" in a


def test_direct_kernel_and_no_disk():
    p = MachineProfile("k", kernel="/boot/vmlinuz", initrd="/i.cpio.gz", append="console=ttyS0")
    a = argv(p, disk=None)
    assert opt_values(a, "-kernel") == ["/boot/vmlinuz"] and opt_values(a, "-append") == ["console=ttyS0"]
    assert "-blockdev" not in a


def test_sandboxed_always():
    a = argv(MachineProfile("w"))
    assert opt_values(a, "-sandbox") == ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    assert confine.SANDBOX == opt_values(a, "-sandbox")[0]


def test_the_disk_chain_is_pinned_layer_by_layer():
    # overlay (h2k's, writable) -> fixed qcow2 -> a raw base: every format given, nothing left to QEMU.
    chain = DiskImage("/w/o.qcow2", (layer("/w/o.qcow2", "qcow2", "/i/f.qcow2"), layer("/i/f.qcow2", "qcow2", "/i/b.raw"),
                                     layer("/i/b.raw", "raw")))
    a = argv(MachineProfile("w"), disk=chain)
    tree = json.loads(opt_values(a, "-blockdev")[0])
    assert tree["node-name"] == "disk0" and tree["driver"] == "qcow2" and tree["read-only"] is False
    assert tree["file"] == {"driver": "file", "filename": "/w/o.qcow2", "read-only": False, "cache": {"no-flush": True},
                            "discard": "unmap"}
    mid = tree["backing"]
    assert mid["driver"] == "qcow2" and mid["read-only"] is True and mid["file"]["filename"] == "/i/f.qcow2"
    base = mid["backing"]
    assert base["driver"] == "raw" and base["read-only"] is True and "backing" not in base
    qcow_base = DiskImage("/b.qcow2", (layer("/b.qcow2", "qcow2"),))
    assert json.loads(opt_values(argv(MachineProfile("w"), disk=qcow_base), "-blockdev")[0])["backing"] is None


def test_paths_with_commas_cannot_add_options():
    evil = "/isos/virtio,media=disk,file.locking=off.iso"
    p = MachineProfile("w", machine_type="pc", disk_bus="sata", cdroms=[evil])
    a = argv(p, disk=DiskImage("/d,x.qcow2", (layer("/d,x.qcow2", "qcow2"),)))
    disk, cd = (json.loads(b) for b in opt_values(a, "-blockdev"))
    assert disk["file"]["filename"] == "/d,x.qcow2" and cd["file"]["filename"] == evil and cd["read-only"] is True
    logs = qemu_cmd.build(MachineProfile("w"), accel=TCG, name="n", fds=FDS, serial_log=Path("/o,a/serial.log"),
                          firmware_log=Path("/o,a/fw.log,x=y"), disk=None).argv
    assert any("logfile=/o,,a/serial.log,logappend=on" in x for x in logs)
    assert any("logfile=/o,,a/fw.log,,x=y,logappend=on" in x for x in logs)
    fw = firmware.find("uefi")
    pf = firmware.qemu_args(fw, Path("/v,readonly=on/VARS.fd"))
    assert json.loads(pf[3])["file"]["filename"] == "/v,readonly=on/VARS.fd"


def test_files_decide_what_qemu_opens():
    seen = []

    def files(path, mode):
        seen.append((path, mode))
        return f"/dev/fdset/{len(seen)}"

    chain = DiskImage("/w/o.qcow2", (layer("/w/o.qcow2", "qcow2", "/i/b.vmdk"),
                                     layer("/i/b.vmdk", "vmdk", files=["/i/b.vmdk", "/i/b-s001.vmdk"])))
    a = qemu_cmd.build(MachineProfile("w", cdroms=["/c.iso"]), accel=TCG, name="n", fds=FDS,
                       serial_log=Path("/o/s.log"), firmware_log=Path("/o/f.log"), disk=chain, files=files).argv
    tree = json.loads(opt_values(a, "-blockdev")[0])
    assert tree["file"]["filename"] == "/dev/fdset/3"
    # a multi-file VMDK finds its extents next to its descriptor: passed by path
    assert tree["backing"]["file"]["filename"] == "/i/b.vmdk"
    assert ("/w/o.qcow2", "rw") in seen and ("/c.iso", "r") in seen and ("/o/s.log", "a") in seen
    assert ("/i/b.vmdk", "r") not in seen
