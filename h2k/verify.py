"""Static boot-readiness rules for a Windows disk on a VirtIO bus: PASS/FAIL each, with a reason.

The rules read hive FILES (so they can be tested on doctored copies in
seconds); :func:`verify_image` gets those files in one read-only launch.

Per storage driver of the target bus (viostor for virtio-blk, vioscsi for virtio-scsi):

* ``sys-present``: the ``.sys`` named by ImagePath exists in ``System32\\drivers``;
* ``service``: ``Type``=1, ``Start``=0, ``ErrorControl`` set, ``ImagePath`` names the ``.sys``
  -- in the LIVE control set (``Select\\Current``);
* ``no-start-override``: no ``StartOverride`` subkey (it silently wins over ``Start``);
* ``binding``: the driver is bound to the VirtIO PCI IDs in the live control set's
  ``CriticalDeviceDatabase`` (``Service`` + the SCSIAdapter ``ClassGUID``), and, when the
  hive has a ``DriverDatabase``, there too (``DeviceIds\\PCI\\<id>`` -> INF -> active package
  -> a configuration with ``Service`` = the driver). A DiskDrive class GUID is a FAIL; a
  binding found only in another control set is a FAIL that says so.

And once: ``bcd``: the boot manager's default loader exists, has a device on this
disk and a path that exists on the system volume; on UEFI ``uefi-fallback``: the
ESP's removable-media loader (``\\EFI\\BOOT\\BOOTX64.EFI`` on x86_64) is a copy of
``\\EFI\\Microsoft\\Boot\\bootmgfw.efi``, because a VM on KVM starts with empty NVRAM
(no "Windows Boot Manager" entry) and OVMF then boots that path.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import hivex

from h2k import bcd as bcdlib
from h2k.errors import InputError
from h2k.inspect import inspect_handle, open_guest, sys_guest_path
from h2k.registry import control_set_name, current_control_set, decode, find_key, find_value

SCSI_ADAPTER_GUID = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
DISK_DRIVE_GUID = "{4D36E967-E325-11CE-BFC1-08002BE10318}"

# (legacy dev, legacy subsys prefix, modern dev) per driver; DESIGN "VirtIO PCI IDs".
VIRTIO_STORAGE = {
    "viostor": ("1001", "0002", "1042"),
    "vioscsi": ("1004", "0008", "1048"),
}
BUS_DRIVERS = {"virtio-blk": ["viostor"], "virtio-scsi": ["vioscsi"]}


def drivers_for_bus(bus: str) -> list[str]:
    out: list[str] = []
    for part in ("virtio-blk+virtio-scsi" if bus == "both" else bus).split("+"):
        if part not in BUS_DRIVERS:
            raise InputError(f"unknown bus {part!r}: use virtio-blk, virtio-scsi or virtio-blk+virtio-scsi")
        out += BUS_DRIVERS[part]
    return out


def pci_ids(driver: str) -> list[str]:
    """Hardware IDs Windows matches for this driver, most specific first (with and without SUBSYS)."""
    legacy, subsys, modern = VIRTIO_STORAGE[driver]
    return [
        f"VEN_1AF4&DEV_{legacy}&SUBSYS_{subsys}1AF4&REV_00",
        f"VEN_1AF4&DEV_{legacy}&SUBSYS_{subsys}1AF4",
        f"VEN_1AF4&DEV_{legacy}",
        f"VEN_1AF4&DEV_{modern}&SUBSYS_11001AF4&REV_01",
        f"VEN_1AF4&DEV_{modern}&SUBSYS_11001AF4",
        f"VEN_1AF4&DEV_{modern}",
    ]


@dataclass
class RuleResult:
    rule: str
    subject: str  # driver name or "BCD"
    passed: bool
    reason: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.rule:<18} {self.subject:<8} {self.reason}"


@dataclass
class VerifyReport:
    image: str
    bus: str
    control_set: int
    results: list[RuleResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        lines = [r.line() for r in self.results]
        n_fail = sum(not r.passed for r in self.results)
        lines.append(
            f"{'PASS' if self.passed else 'FAIL'}: {len(self.results) - n_fail}/{len(self.results)} rules passed "
            f"for {self.bus} (live control set {control_set_name(self.control_set)})"
        )
        return "\n".join(lines)


def _val(h, key: str, name: str) -> object | None:
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    return None if got is None else decode(*got)


def _guid(v: object) -> str:
    return str(v or "").strip().upper()


def check_service(h, ccs: int, drv: str, file_exists: Callable[[str], bool], system_root: str) -> list[RuleResult]:
    live = f"{control_set_name(ccs)}\\Services\\{drv}"
    node = find_key(h, live)
    out: list[RuleResult] = []
    if node is None:
        elsewhere = _other_sets_with(h, ccs, f"Services\\{drv}")
        why = f"no {live}" + (f" (it exists only in {', '.join(elsewhere)}, not the live set)" if elsewhere else "")
        out.append(RuleResult("service", drv, False, why))
        out.append(RuleResult("sys-present", drv, file_exists(sys_guest_path(system_root, None, drv)),
                              f"System32\\drivers\\{drv}.sys (no service key to name it)"))
        return out
    problems = []
    typ, start, err, image = (_val(h, live, n) for n in ("Type", "Start", "ErrorControl", "ImagePath"))
    if typ != 1:
        problems.append(f"Type={typ} (want 1, kernel driver)")
    if start != 0:
        problems.append(f"Start={start} (want 0, boot start)")
    if err not in (0, 1, 2, 3):
        problems.append(f"ErrorControl={err} (want 1)")
    if not isinstance(image, str) or not image.lower().endswith(f"{drv.lower()}.sys"):
        problems.append(f"ImagePath={image!r} (want system32\\drivers\\{drv}.sys)")
    out.append(RuleResult("service", drv, not problems, "; ".join(problems) or f"{live}: Type=1 Start=0 ErrorControl={err} ImagePath={image}"))
    sys_path = sys_guest_path(system_root, image if isinstance(image, str) else None, drv)
    present = file_exists(sys_path)
    out.append(RuleResult("sys-present", drv, present, f"{sys_path} {'exists' if present else 'is MISSING'}"))
    override = h.node_get_child(node, "StartOverride") is not None
    out.append(RuleResult("no-start-override", drv, not override,
                          f"{live}\\StartOverride {'exists (it overrides Start on Windows 8+)' if override else 'absent'}"))
    return out


def _other_sets_with(h, ccs: int, rel: str) -> list[str]:
    found = []
    for child in h.node_children(h.root()):
        name = h.node_name(child)
        if name.lower().startswith("controlset") and name.lower() != control_set_name(ccs).lower():
            if find_key(h, f"{name}\\{rel}") is not None:
                found.append(name)
    return found


def check_cddb(h, ccs: int, drv: str, required: bool) -> RuleResult:
    """CriticalDeviceDatabase in the live control set: Service=drv and the SCSIAdapter class."""
    base = f"{control_set_name(ccs)}\\Control\\CriticalDeviceDatabase"
    good, bad = [], []
    for hwid in pci_ids(drv):
        key = f"{base}\\PCI#{hwid}"
        if find_key(h, key) is None:
            continue
        svc, cls = _val(h, key, "Service"), _guid(_val(h, key, "ClassGUID"))
        if str(svc or "").lower() != drv.lower():
            bad.append(f"PCI#{hwid} Service={svc!r}")
        elif cls == DISK_DRIVE_GUID:
            bad.append(f"PCI#{hwid} ClassGUID is DiskDrive {cls} (must be SCSIAdapter {SCSI_ADAPTER_GUID})")
        elif cls != SCSI_ADAPTER_GUID:
            bad.append(f"PCI#{hwid} ClassGUID={cls or 'missing'} (must be SCSIAdapter {SCSI_ADAPTER_GUID})")
        else:
            good.append(hwid)
    if bad:
        return RuleResult("binding-cddb", drv, False, "; ".join(bad))
    if good:
        return RuleResult("binding-cddb", drv, True, f"{len(good)} PCI ID(s) -> {drv}, SCSIAdapter, in {control_set_name(ccs)}")
    elsewhere = _other_sets_with(h, ccs, f"Control\\CriticalDeviceDatabase\\PCI#{pci_ids(drv)[0]}")
    if elsewhere:
        return RuleResult("binding-cddb", drv, False,
                          f"bound only in {', '.join(elsewhere)}, not in the live {control_set_name(ccs)}")
    return RuleResult("binding-cddb", drv, not required,
                      f"no CriticalDeviceDatabase entry in {control_set_name(ccs)}"
                      + ("" if required else " (not needed: DriverDatabase binds on Windows 8+)"))


def check_driver_database(h, drv: str) -> RuleResult:
    """DriverDatabase: DeviceIds\\PCI\\<id> -> INF -> active package -> configuration with Service=drv."""
    problems: list[str] = []
    infs: set[str] = set()
    for hwid in pci_ids(drv):
        node = find_key(h, f"DriverDatabase\\DeviceIds\\PCI\\{hwid}")
        if node is not None:
            infs |= {h.value_key(v) for v in h.node_values(node) if h.value_key(v).lower().endswith(".inf")}
    if not infs:
        return RuleResult("binding-drvdb", drv, False, f"no DriverDatabase\\DeviceIds\\PCI entry for {drv}'s PCI IDs")
    for inf in sorted(infs):
        active = _val(h, f"DriverDatabase\\DriverInfFiles\\{inf}", "Active")
        if not isinstance(active, str) or not active:
            problems.append(f"DriverInfFiles\\{inf} has no Active package")
            continue
        pkg = f"DriverDatabase\\DriverPackages\\{active}"
        if find_key(h, pkg) is None:
            problems.append(f"active package {active} missing from DriverPackages")
            continue
        cfgs = find_key(h, f"{pkg}\\Configurations")
        services = [_val(h, f"{pkg}\\Configurations\\{h.node_name(c)}", "Service") for c in (h.node_children(cfgs) if cfgs else [])]
        if drv.lower() not in {str(s).lower() for s in services if s}:
            problems.append(f"{active}: no configuration with Service={drv}")
        cls = _package_class(h, pkg)
        if cls == DISK_DRIVE_GUID:
            problems.append(f"{active}: class is DiskDrive {cls} (must be SCSIAdapter)")
        elif cls is not None and cls != SCSI_ADAPTER_GUID:
            problems.append(f"{active}: class {cls} is not SCSIAdapter")
        if not problems:
            return RuleResult("binding-drvdb", drv, True, f"DriverDatabase: PCI IDs -> {inf} -> {active} -> Service={drv}")
    return RuleResult("binding-drvdb", drv, False, "; ".join(problems))


def _package_class(h, pkg: str) -> str | None:
    """A package's class GUID: a ClassGuid value if written, else found inside the binary Version value."""
    node = find_key(h, pkg)
    for name in ("ClassGuid", "ClassGUID", "Class"):
        got = find_value(h, node, name) if node is not None else None
        if got is not None:
            val = decode(*got)
            if isinstance(val, str) and val.startswith("{"):
                return _guid(val)
    got = find_value(h, node, "Version") if node is not None else None
    if got is not None:
        import uuid

        for guid in (SCSI_ADAPTER_GUID, DISK_DRIVE_GUID):
            if uuid.UUID(guid).bytes_le in got[1]:
                return guid
    return None


def check_bcd(bcd_file: Path | None, path_exists, device_exists) -> RuleResult:
    if bcd_file is None:
        return RuleResult("bcd", "BCD", False, "no BCD store found (ESP \\EFI\\Microsoft\\Boot\\BCD or \\Boot\\BCD)")
    try:
        store = bcdlib.read_store(bcd_file)
    except InputError as exc:
        return RuleResult("bcd", "BCD", False, str(exc))
    check = bcdlib.check_store(store, path_exists, device_exists)
    if check.ok:
        return RuleResult("bcd", "BCD", True, f"default loader {check.default_loader} -> {check.loader_path}")
    return RuleResult("bcd", "BCD", False, "; ".join(check.problems))


FALLBACK_PROBLEMS = {
    "missing": "is missing: with empty NVRAM OVMF finds nothing to boot",
    "differs": "is not Windows' boot manager (differs from {bootmgr})",
    "no-bootmgfw": "cannot be checked: {bootmgr} is not on the ESP",
}


def check_uefi_fallback(firmware: str, state: str | None, path: str | None) -> RuleResult | None:
    """``uefi-fallback`` from inspection's comparison (None on BIOS: the rule does not apply)."""
    if firmware != "uefi":
        return None
    shown = (path or "\\EFI\\BOOT\\BOOTX64.EFI").replace("/", "\\")
    bootmgr = "\\EFI\\Microsoft\\Boot\\bootmgfw.efi"
    if state == "same":
        return RuleResult("uefi-fallback", "ESP", True, f"{shown} is a copy of {bootmgr}")
    if state is None:
        return RuleResult("uefi-fallback", "ESP", False, "no ESP found on the system disk")
    why = FALLBACK_PROBLEMS.get(state, state).format(bootmgr=bootmgr)
    return RuleResult("uefi-fallback", "ESP", False, f"{shown} {why}")


def verify_hives(
    system_hive: Path,
    bus: str,
    file_exists: Callable[[str], bool],
    *,
    system_root: str = "/Windows",
    bcd_file: Path | None = None,
    check_bcd_store: bool = True,
    path_exists: Callable[[str], bool] | None = None,
    device_exists=None,
) -> tuple[int, list[RuleResult]]:
    """All rules on a SYSTEM hive file (+ BCD); ``file_exists`` answers guest paths."""
    drivers = drivers_for_bus(bus)
    try:
        h = hivex.Hivex(str(system_hive))
    except RuntimeError as exc:
        raise InputError(f"SYSTEM hive is unreadable ({exc})") from exc
    ccs = current_control_set(h)
    has_drvdb = find_key(h, "DriverDatabase") is not None
    results: list[RuleResult] = []
    for drv in drivers:
        results += check_service(h, ccs, drv, file_exists, system_root)
        results.append(check_cddb(h, ccs, drv, required=not has_drvdb))
        if has_drvdb:
            results.append(check_driver_database(h, drv))
    if check_bcd_store:
        results.append(check_bcd(bcd_file, path_exists, device_exists))
    return ccs, results


def verify_image(image: str | Path, bus: str, metadata: dict[str, Any] | None = None) -> VerifyReport:
    """Run every rule on ``image`` in one read-only libguestfs launch."""
    drivers_for_bus(bus)  # bad bus -> InputError before the launch
    from h2k.overlay import image_format

    image_format(image)
    g = open_guest(image, readonly=True)
    try:
        with tempfile.TemporaryDirectory(prefix="h2k-verify-") as tmp:
            insp = inspect_handle(g, str(image), tmp, metadata)
            facts = insp.facts
            if "SYSTEM" not in insp.local_hives:
                raise InputError(f"{image}: no SYSTEM hive to verify")

            def exists(path: str) -> bool:
                return insp.win_find(path) is not None

            bcd_file = None
            if facts.bcd_device and facts.bcd_path:
                bcd_file = Path(tmp) / "BCD"
                g.download(insp.mounts.p(facts.bcd_device, facts.bcd_path), str(bcd_file))
            ccs, results = verify_hives(
                insp.local_hives["SYSTEM"], bus, exists, system_root=facts.system_root, bcd_file=bcd_file,
                path_exists=exists, device_exists=lambda ref: insp.layout.find_ref(ref) is not None,
            )
            fallback = check_uefi_fallback(facts.firmware, facts.uefi_fallback, facts.uefi_fallback_path)
            if fallback is not None:
                results.append(fallback)
    finally:
        g.close()
    return VerifyReport(image=str(image), bus=bus, control_set=ccs, results=results)
