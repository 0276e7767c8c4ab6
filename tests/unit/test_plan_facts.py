"""Hand-made WindowsFacts for the planner's unit and property tests (shapes of the phony test-bed disks)."""

from __future__ import annotations

from h2k.facts import Blocker, NicConfig, ServiceInfo, WindowsFacts


def facts(**kw) -> WindowsFacts:
    base = dict(
        root="/dev/sda2", product_name="Windows Server 2019 Standard", edition="ServerStandard",
        major=10, minor=0, build=17763, arch="x86_64", system_root="/Windows", current_control_set=1,
        firmware="bios", firmware_source="partition-table", bcd_device="/dev/sda1", bcd_path="/Boot/BCD",
        drive_mappings={"C:": "/dev/sda2"}, has_driver_database=True, is_server=True,
        storage_drivers=[ServiceInfo("pvscsi", start=0, type=1, image_path="System32\\drivers\\pvscsi.sys",
                                     group="SCSI miniport", file_present=True)],
        network_drivers=[ServiceInfo("vmxnet3ndis6", start=3, type=1, file_present=True)],
        hypervisor_tools=["vmware"],
        nics=[NicConfig("{4D1C2A3B-0000-4000-8000-000000000001}", False, ["192.168.50.10"], ["255.255.255.0"],
                        ["192.168.50.1"], ["192.168.50.2", "192.168.50.3"])],
    )
    base.update(kw)
    return WindowsFacts(**base)


def win2019(**kw) -> WindowsFacts:
    return facts(**kw)


def win2022(**kw) -> WindowsFacts:
    kw.setdefault("product_name", "Windows Server 2022 Datacenter")
    kw.setdefault("edition", "ServerDatacenter")
    kw.setdefault("build", 20348)
    kw.setdefault("current_control_set", 2)
    kw.setdefault("firmware", "uefi")
    kw.setdefault("bcd_device", "/dev/sda1")
    kw.setdefault("bcd_path", "/EFI/Microsoft/Boot/BCD")
    kw.setdefault("root", "/dev/sda3")
    kw.setdefault("drive_mappings", {"C:": "/dev/sda3"})
    return facts(**kw)


def win11(**kw) -> WindowsFacts:
    kw.setdefault("product_name", "Windows 10 Pro")  # sic: Windows 11 keeps this ProductName
    kw.setdefault("edition", "Professional")
    kw.setdefault("build", 22631)
    kw.setdefault("is_server", False)
    kw.setdefault("firmware", "uefi")
    kw.setdefault("bcd_path", "/EFI/Microsoft/Boot/BCD")
    return facts(**kw)


def win7(**kw) -> WindowsFacts:
    kw.setdefault("product_name", "Windows 7 Professional")
    kw.setdefault("edition", "Professional")
    kw.setdefault("major", 6)
    kw.setdefault("minor", 1)
    kw.setdefault("build", 7601)
    kw.setdefault("is_server", False)
    kw.setdefault("has_driver_database", False)
    return facts(**kw)


def hibernated() -> WindowsFacts:
    return facts(blockers=[Blocker("hibernated", "hiberfil.sys starts with HIBR: Windows is hibernated")])
