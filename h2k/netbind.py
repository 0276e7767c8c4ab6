"""Which TCP/IP interfaces belong to a network adapter that was present: static IPs only from those.

``Tcpip\\Parameters\\Interfaces`` keeps an interface key for every adapter the
machine ever had; a VM whose NIC was changed (e1000 -> vmxnet3), a P2V'd
machine, or an unplugged USB adapter leaves "ghost" interfaces with their old
static addresses. Windows ties an interface to its adapter like this:

* the adapter's driver key ``Control\\Class\\{4D36E972-...}\\NNNN`` holds
  ``NetCfgInstanceId`` = the interface GUID;
* ``Control\\Network\\{4D36E972-...}\\{GUID}\\Connection\\PnPInstanceId`` names
  the device instance under ``Enum``, whose ``Driver`` is ``{4D36E972-...}\\NNNN``.

Whether a device is present is known to the PnP manager at run time, not
stored in the registry (Microsoft, "Enumerating installed devices"), so offline
the last evidence is what the kernel writes into the device's properties
(``Enum\\...\\Properties\\{83da6326-97a6-4088-9453-a1923f573b29}``): on arrival
it sets ``0066`` (DEVPKEY_Device_LastArrivalDate) and deletes ``0067``
(DEVPKEY_Device_LastRemovalDate); on removal it sets ``0067``. An interface is
kept when its adapter and device instance exist and the device was neither
removed after its last arrival nor last arrived long before the boot disk
controller did (that is, it was not enumerated at the last boot). Disks without
these properties (Windows 7) keep every interface that has a device instance.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from h2k.registry import decode, find_key, find_value

NET_CLASS = "{4D36E972-E325-11CE-BFC1-08002BE10318}"
DEVICE_TIMES = "Properties\\{83da6326-97a6-4088-9453-a1923f573b29}"
LAST_ARRIVAL, LAST_REMOVAL = "0066", "0067"
# A device that last arrived more than this before the boot controller did was not there at the last boot.
SAME_BOOT = 3600 * 10**7  # FILETIME ticks (100 ns)


@dataclass(frozen=True)
class InterfaceBinding:
    guid: str
    ghost: str | None  # why no present adapter is bound to it; None when one is


def _str(h, key: str, name: str) -> str | None:
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    val = None if got is None else decode(*got)
    return val if isinstance(val, str) else None


def device_time(h, ccs: int, instance: str, which: str) -> int | None:
    """A FILETIME device property (``0066`` arrival, ``0067`` removal) of an Enum device instance, or None."""
    node = find_key(h, f"ControlSet{ccs:03d}\\Enum\\{instance}\\{DEVICE_TIMES}\\{which}")
    got = None if node is None else find_value(h, node, "")
    if got is None or len(got[1]) < 8:
        return None
    return struct.unpack_from("<Q", got[1])[0]


def filetime_text(ft: int) -> str:
    import datetime

    when = datetime.datetime(1601, 1, 1) + datetime.timedelta(microseconds=ft // 10)
    return when.strftime("%Y-%m-%d %H:%M")


def boot_controller_arrival(h, ccs: int, storage_services: list[str]) -> int | None:
    """When the boot disk controller last arrived: the newest arrival among PCI devices of boot-start storage services."""
    boot = {s.lower() for s in storage_services}
    pci = find_key(h, f"ControlSet{ccs:03d}\\Enum\\PCI")
    newest = None
    for dev in h.node_children(pci) if pci is not None else []:
        for inst in h.node_children(dev):
            instance = f"PCI\\{h.node_name(dev)}\\{h.node_name(inst)}"
            service = _str(h, f"ControlSet{ccs:03d}\\Enum\\{instance}", "Service")
            if service and service.lower() in boot:
                t = device_time(h, ccs, instance, LAST_ARRIVAL)
                if t is not None and (newest is None or t > newest):
                    newest = t
    return newest


def adapters_by_interface(h, ccs: int) -> dict[str, str]:
    """Interface GUID (upper case) -> the Net class driver key ``NNNN`` that names it in ``NetCfgInstanceId``."""
    base = f"ControlSet{ccs:03d}\\Control\\Class\\{NET_CLASS}"
    node = find_key(h, base)
    found: dict[str, str] = {}
    for child in h.node_children(node) if node is not None else []:
        guid = _str(h, f"{base}\\{h.node_name(child)}", "NetCfgInstanceId")
        if guid:
            found[guid.upper()] = h.node_name(child)
    return found


def bind_interface(h, ccs: int, guid: str, adapters: dict[str, str], boot_arrival: int | None) -> InterfaceBinding:
    """Whether interface ``guid`` is bound to an adapter whose device was present at the last boot, and if not why."""
    cs = f"ControlSet{ccs:03d}"
    adapter = adapters.get(guid.upper())
    if adapter is None:
        return InterfaceBinding(guid, "no network adapter has this interface (no NetCfgInstanceId names it)")
    instance = _str(h, f"{cs}\\Control\\Network\\{NET_CLASS}\\{guid}\\Connection", "PnPInstanceId")
    driver = None if instance is None else _str(h, f"{cs}\\Enum\\{instance}", "Driver")
    if instance is None or driver is None or driver.upper() != f"{NET_CLASS}\\{adapter}":
        return InterfaceBinding(guid, f"its adapter (Class {NET_CLASS}\\{adapter}) has no device instance in Enum")
    arrived = device_time(h, ccs, instance, LAST_ARRIVAL)
    removed = device_time(h, ccs, instance, LAST_REMOVAL)
    if removed is not None and (arrived is None or removed >= arrived):
        return InterfaceBinding(guid, f"its adapter {instance} was removed {filetime_text(removed)} and has not arrived since")
    if arrived is not None and boot_arrival is not None and arrived < boot_arrival - SAME_BOOT:
        return InterfaceBinding(guid, f"its adapter {instance} last arrived {filetime_text(arrived)}, before the last "
                                      f"boot ({filetime_text(boot_arrival)}): not present")
    return InterfaceBinding(guid, None)
