"""h2k.inf on the fake virtio-win INFs and on hand-written INF texts with quirks."""

from __future__ import annotations

import pytest

from h2k import inf as infmod
from h2k.errors import InputError
from lab.testbed import virtio_win

SCSI_GUID = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
NET_GUID = "{4D36E972-E325-11CE-BFC1-08002BE10318}"
SYSTEM_GUID = "{4D36E97D-E325-11CE-BFC1-08002BE10318}"


def _fake(folder: str, os_folder: str = "2k19", arch: str = "amd64", version: str = "100.1.2.3") -> infmod.InfFile:
    drv = next(d for d in virtio_win.DRIVERS if d.folder == folder)
    text = virtio_win.render_inf(drv, os_folder, arch, version, "01/02/2025")
    return infmod.parse_text(text, f"{folder}.inf")


def test_fake_viostor():
    inf = _fake("viostor")
    assert inf.class_name == "SCSIAdapter"
    assert inf.class_guid == SCSI_GUID
    assert inf.driver_date == "01/02/2025"
    assert inf.driver_version == "100.1.2.3"
    assert inf.provider == "H2K Fake Red Hat, Inc."
    assert inf.catalog == "viostor.cat"
    assert inf.hardware_ids("amd64") == [
        "PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00", "PCI\\VEN_1AF4&DEV_1001",
        "PCI\\VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01", "PCI\\VEN_1AF4&DEV_1042",
    ]
    assert inf.hardware_ids("x86") == []  # only an NTamd64 Models section
    svc = inf.associated_service
    assert (svc.name, svc.service_type, svc.start_type, svc.error_control) == ("viostor", 1, 0, 1)
    assert svc.service_binary == "%12%\\viostor.sys" and svc.binary_name == "viostor.sys"
    assert svc.load_order_group == "SCSI miniport"
    assert inf.source_files == ["viostor.sys"]
    # %% in a quoted AddReg field is a literal percent sign.
    ev = inf.section("miniport_EventLog_AddReg")[0].fields
    assert ev[3] == "0x00020000"
    assert ev[4] == "%SystemRoot%\\System32\\IoLogMsg.dll"


def test_fake_vioscsi_and_netkvm_and_system():
    scsi = _fake("vioscsi", "w10", "x86")
    assert scsi.hardware_ids("x86")[0] == "PCI\\VEN_1AF4&DEV_1004&SUBSYS_00081AF4&REV_00"
    assert "PCI\\VEN_1AF4&DEV_1048&SUBSYS_11001AF4&REV_01" in scsi.hardware_ids("x86")
    assert scsi.associated_service.start_type == 0
    net = _fake("NetKVM")
    assert (net.class_name, net.class_guid) == ("Net", NET_GUID)
    s = net.associated_service
    assert (s.name, s.start_type, s.load_order_group, s.binary_name) == ("netkvm", 3, "NDIS", "netkvm.sys")
    assert "PCI\\VEN_1AF4&DEV_1041" in net.hardware_ids("amd64")
    bal = _fake("Balloon")
    assert (bal.class_name, bal.class_guid) == ("System", SYSTEM_GUID)
    assert bal.associated_service.name == "BALLOON"
    assert bal.associated_service.start_type == 3


HANDWRITTEN = r"""
; A hand-written INF with the quirks found in real driver packages.
  ; indented comment
[version]
signature="$Windows NT$"
CLASS = SCSIAdapter   ; trailing comment
classguid={4d36e97b-e325-11ce-bfc1-08002be10318}
Provider = %Mfg%
CatalogFile.NTamd64 = quirk64.cat
DriverVer = 10/01/2023, \
            62.1.0.7       ; continued on the next line

[Manufacturer]
%Mfg% = Quirk, NTx86, NTamd64.10.0...17763

[Quirk.NTx86]
%Dev.Desc% = quirk_inst, PCI\VEN_1AF4&DEV_1001

[QUIRK.ntamd64.10.0...17763]
"Quoted ""desc"" ; not a comment" = quirk_inst, \
    PCI\VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01, PCI\VEN_1AF4&DEV_1042

[quirk_inst.NTamd64.Services]
AddService = quirkstor, 0x00000002 , quirk_svc
addservice = QuirkStor, 2, quirk_svc   ; duplicate, ignored

[Quirk_Svc]
ServiceType   = %SERVICE_KERNEL_DRIVER%
StartType=0
ErrorControl  = 0x1
ServiceBinary = %12%\quirkstor.sys
LoadOrderGroup = "SCSI miniport"

[SourceDisksFiles.amd64]
quirkstor.sys = 1

[Strings.0407]
Mfg = "Falscher Hersteller"
Dev.Desc = "Beschreibung"

[Strings]
Mfg = "Quirk, Inc."      ; comma inside quotes
SERVICE_KERNEL_DRIVER = 1
"""


def test_handwritten_quirks():
    inf = infmod.parse_text(HANDWRITTEN)
    assert inf.class_name == "SCSIAdapter"
    assert inf.class_guid == "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
    assert inf.provider == "Quirk, Inc."  # [Strings] wins over [Strings.0407]
    assert inf.catalog == "quirk64.cat"
    assert (inf.driver_date, inf.driver_version) == ("10/01/2023", "62.1.0.7")
    assert inf.hardware_ids("amd64") == ["PCI\\VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01", "PCI\\VEN_1AF4&DEV_1042"]
    assert inf.hardware_ids("x86") == ["PCI\\VEN_1AF4&DEV_1001"]
    amd = [m for m in inf.models if m.decoration.startswith("NTamd64")][0]
    assert amd.description == 'Quoted "desc" ; not a comment'
    x86 = [m for m in inf.models if m.decoration == "NTx86"][0]
    assert x86.description == "Beschreibung"  # only in the localised strings
    assert len(inf.services) == 1
    s = inf.services[0]
    assert (s.name, s.flags, s.service_type, s.start_type, s.error_control) == ("quirkstor", 2, 1, 0, 1)
    assert s.load_order_group == "SCSI miniport"
    assert inf.source_files == ["quirkstor.sys"]


def test_utf16_and_crlf():
    text = HANDWRITTEN.replace("\n", "\r\n")
    data = b"\xff\xfe" + text.encode("utf-16-le")
    inf = infmod.parse_text(infmod._decode(data))
    assert inf.driver_version == "62.1.0.7"
    assert inf.services[0].binary_name == "quirkstor.sys"


UNDECORATED = """
[Version]
Signature="$CHICAGO$"
Class=Net
ClassGUID={4d36e972-e325-11ce-bfc1-08002be10318}
DriverVer=06/21/2006,6.1.7600.16385
[Manufacturer]
"Old Vendor"=Old
[Old]
"Old NIC"=old.ndi,PCI\\VEN_1AF4&DEV_1000&SUBSYS_00011AF4&REV_00
[old.ndi.Services]
AddService=oldnet,2,old.svc
[old.svc]
ServiceType=1
StartType=3
ErrorControl=1
ServiceBinary=%12%\\oldnet.sys
"""


def test_undecorated_models_match_any_arch():
    inf = infmod.parse_text(UNDECORATED)
    assert inf.hardware_ids("ARM64") == ["PCI\\VEN_1AF4&DEV_1000&SUBSYS_00011AF4&REV_00"]
    assert inf.provider is None and inf.catalog is None
    assert inf.associated_service.name == "oldnet"


def test_not_an_inf():
    with pytest.raises(InputError, match="Version"):
        infmod.parse_text("[Strings]\na=b\n", "x.inf")
    with pytest.raises(InputError, match="unterminated"):
        infmod.parse_text("[Version\n", "x.inf")


def test_parse_file_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        infmod.parse_file(tmp_path / "missing.inf")


def test_addreg_entries():
    inf = _fake("viostor")
    svc = inf.associated_service
    assert svc.addreg_sections == ["pnpsafe_pci_addreg"]
    entries = infmod.addreg(inf, "pnpsafe_pci_addreg")
    assert [(e.root, e.subkey, e.name, e.reg_type, e.data()) for e in entries] == [
        ("HKR", "Parameters\\PnpInterface", "5", 4, 1), ("HKR", "Parameters", "BusType", 4, 1)]
    msi = infmod.addreg(inf, "msi_addreg")
    assert msi[0].key_only and msi[0].name is None and msi[0].subkey == "Interrupt Management"
    assert (msi[2].name, msi[2].data()) == ("MSISupported", 1)
    ev = infmod.addreg(inf, "miniport_EventLog_AddReg")[0]
    assert (ev.name, ev.reg_type, ev.data()) == ("EventMessageFile", 2, "%SystemRoot%\\System32\\IoLogMsg.dll")
    text = '[Version]\nSignature="$Windows NT$"\n[r]\nHKR,,Multi,0x00010000,"a","b, c"\nHKR,,Bin,1,0a,FF\n'
    m, b = infmod.addreg(infmod.parse_text(text), "r")
    assert (m.reg_type, m.data()) == (7, ["a", "b, c"])
    assert (b.reg_type, b.data()) == (3, "0aff")
