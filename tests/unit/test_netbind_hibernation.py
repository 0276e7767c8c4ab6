"""Pure rules of inspection, on real hives (hivex): which Tcpip interfaces belong to a present adapter
(h2k.netbind, read through h2k.inspect.read_nics), and which hiberfil.sys headers hold a resumable image."""

from __future__ import annotations

import struct

import hivex
import pytest

from h2k import hibernation
from h2k.inspect import read_nics
from lab.testbed import regtext
from lab.testbed.hive import make_hive

ROOT = "HKEY_LOCAL_MACHINE\\SYSTEM"
CCS = "HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001"
NET = "{4d36e972-e325-11ce-bfc1-08002be10318}"
TIMES = "Properties\\{83da6326-97a6-4088-9453-a1923f573b29}"
HOUR = 3600 * 10**7
BOOT = 133_590_000_000_000_000  # a FILETIME (May 2024)
STORAGE = "PCI\\VEN_15AD&DEV_07C0&SUBSYS_07C015AD&REV_02\\FF565000B8F0E5FE00"


def _times(instance: str, arrived: int | None, removed: int | None) -> str:
    text = ""
    for which, ft in (("0066", arrived), ("0067", removed)):
        if ft is not None:
            data = ",".join(f"{b:02x}" for b in struct.pack("<Q", ft))
            text += f"[{CCS}\\Enum\\{instance}\\{TIMES}\\{which}]\r\n@=hex(ffff0010):{data}\r\n\r\n"
    return text


def _interface(guid: str, address: str) -> str:
    return (f"[{CCS}\\Services\\Tcpip\\Parameters\\Interfaces\\{guid}]\r\n\"EnableDHCP\"=dword:00000000\r\n"
            f"\"IPAddress\"=<<multi_sz:{address}>>\r\n\"SubnetMask\"=<<multi_sz:255.255.255.0>>\r\n\r\n")


def _adapter(n: int, guid: str, instance: str, address: str, arrived: int | None = None, removed: int | None = None,
             driver: str | None = None) -> str:
    esc = instance.replace("\\", "\\\\")
    return (f"[{CCS}\\Control\\Class\\{NET}\\{n:04d}]\r\n\"NetCfgInstanceId\"=\"{guid}\"\r\n\r\n"
            f"[{CCS}\\Control\\Network\\{NET.upper()}\\{guid}\\Connection]\r\n\"PnPInstanceId\"=\"{esc}\"\r\n\r\n"
            f"[{CCS}\\Enum\\{instance}]\r\n\"Service\"=\"nic\"\r\n"
            f"\"Driver\"=\"{driver or NET + chr(92) * 2 + f'{n:04d}'}\"\r\n\r\n"
            + _times(instance, arrived, removed) + _interface(guid, address))


def _nics(tmp_path, body: str, boot_arrival: int | None = BOOT):
    storage = f"[{CCS}\\Enum\\{STORAGE}]\r\n\"Service\"=\"pvscsi\"\r\n\r\n" + _times(STORAGE, boot_arrival, None)
    text = regtext.expand_template("Windows Registry Editor Version 5.00\r\n\r\n" + storage + body, {})
    h = hivex.Hivex(str(make_hive(tmp_path / "SYSTEM", text, ROOT)))
    nics, ghosts = read_nics(h, 1, ["pvscsi"])
    return [n.addresses[0] for n in nics], {g.split(" ")[1]: g for g in ghosts}


def test_only_the_interface_of_the_present_adapter_is_kept(tmp_path) -> None:
    live = "PCI\\VEN_15AD&DEV_07B0&SUBSYS_07B015AD&REV_01\\FF565000B8F0E5FE00"
    old_e1000 = "PCI\\VEN_8086&DEV_100F&SUBSYS_075015AD&REV_01\\000C29FFFF2C6A4A00"
    usb = "USB\\VID_0B95&PID_1790\\00000000000A1B"
    body = (_adapter(1, "{11111111-0000-4000-8000-000000000001}", live, "192.168.1.10", arrived=BOOT + 5 * 10**7)
            + _adapter(7, "{11111111-0000-4000-8000-000000000007}", old_e1000, "10.20.30.40", arrived=BOOT - 2000 * HOUR)
            + _adapter(8, "{11111111-0000-4000-8000-000000000008}", usb, "172.16.5.5", arrived=BOOT + 10**7,
                       removed=BOOT + 2 * HOUR)
            + _interface("{11111111-0000-4000-8000-0000000000ff}", "10.99.1.1"))
    kept, ghosts = _nics(tmp_path, body)
    assert kept == ["192.168.1.10"]
    assert "before the last boot" in ghosts["10.20.30.40:"]
    assert "was removed" in ghosts["172.16.5.5:"]
    assert "no network adapter has this interface" in ghosts["10.99.1.1:"]


def test_an_adapter_that_arrived_again_after_a_removal_is_present(tmp_path) -> None:
    """The kernel deletes LastRemovalDate on arrival; a removal older than the last arrival still means present."""
    inst = "USB\\VID_0B95&PID_1790\\00000000000A1B"
    kept, ghosts = _nics(tmp_path, _adapter(2, "{22222222-0000-4000-8000-000000000002}", inst, "172.16.9.9",
                                            arrived=BOOT + HOUR, removed=BOOT - HOUR))
    assert kept == ["172.16.9.9"] and not ghosts


def test_an_adapter_whose_device_is_gone_or_points_elsewhere_is_a_ghost(tmp_path) -> None:
    inst = "PCI\\VEN_8086&DEV_10D3&SUBSYS_07D015AD&REV_00\\000C29FFFF000000"
    kept, ghosts = _nics(tmp_path, _adapter(3, "{33333333-0000-4000-8000-000000000003}", inst, "10.3.3.3",
                                            driver=NET + "\\\\0004"))
    assert kept == [] and "no device instance in Enum" in ghosts["10.3.3.3:"]


def test_without_device_times_every_bound_interface_is_kept(tmp_path) -> None:
    """Windows 7 keeps no arrival/removal times: binding alone decides (and is reported as such in the docs)."""
    inst = "PCI\\VEN_8086&DEV_100F&SUBSYS_075015AD&REV_01\\000C29FFFF2C6A4A00"
    kept, ghosts = _nics(tmp_path, _adapter(4, "{44444444-0000-4000-8000-000000000004}", inst, "10.4.4.4"),
                         boot_arrival=None)
    assert kept == ["10.4.4.4"] and not ghosts


@pytest.mark.parametrize("head,resumable", [
    (b"HIBR" + bytes(12), True),  # Windows 8+: a complete image (hibernation or Fast Startup)
    (b"hibr" + bytes(12), True),  # Windows XP-7
    (b"RSTR" + bytes(12), True),  # a resume that began and did not finish
    (bytes(16), False),  # Windows 8+ after a resume or a full shutdown: header zeroed
    (b"wake" + bytes(12), False),  # Windows 7 after a resume
    (b"WAKE" + bytes(12), False),
])
def test_resumable_header(head, resumable) -> None:
    assert hibernation.resumable(head) is resumable


def test_fast_startup_blocks_only_with_a_resumable_image() -> None:
    assert hibernation.blockers(None, hiberboot=True) == []
    assert hibernation.blockers(bytes(4096), hiberboot=True) == []  # HiberbootEnabled=1, cleanly shut down
    (fast,) = hibernation.blockers(b"HIBR", hiberboot=True)
    assert fast.kind == "fast-startup" and "shutdown /s /t 0" in fast.detail and "powercfg /h off" in fast.detail
    assert "/hybrid" not in fast.detail  # shutdown /hybrid is what leaves the image
    (hib,) = hibernation.blockers(b"hibr", hiberboot=False)
    assert hib.kind == "hibernated" and "shutdown /s /t 0" in hib.detail
