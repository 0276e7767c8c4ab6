"""A fake virtio-win driver pack in the real layout: ``<driver>/<os>/<arch>/``.

The tree mirrors the published virtio-win ISO: one folder per driver
(viostor, vioscsi, NetKVM, Balloon, vioserial, viorng, pvpanic), one per
Windows release (w7 ... w11, 2k8 ... 2k25), one per architecture (amd64, x86,
ARM64 where the real pack has them), plus ``guest-agent/qemu-ga-*.msi``.
Each driver folder holds a realistic INF (rendered from
``virtio_win_data/*.inf.in``), a ``.cat`` and a ``.sys`` whose content names
driver, OS folder, arch and version, so a test can tell which file was copied:

    H2K-FAKE-DRIVER viostor 2k19 amd64 100.95.104.26200

The driver version is a recipe parameter, so a "candidate" pack can differ
from the "current" one (the driver-pack gate tests need two).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab.testbed import cache

DATA = Path(__file__).with_name("virtio_win_data")

DEFAULT_VERSION = "100.95.104.26200"
DEFAULT_RELEASE = "0.1.266"
DEFAULT_DATE = "08/13/2024"
# A newer "candidate" pack for driver-pack gate tests: same layout, different version.
CANDIDATE_VERSION = "100.96.104.26500"
CANDIDATE_RELEASE = "0.1.271"
CANDIDATE_DATE = "11/04/2024"

CLIENT_OS = ["w7", "w8", "w8.1", "w10", "w11"]
SERVER_OS = ["2k8", "2k8R2", "2k12", "2k12R2", "2k16", "2k19", "2k22", "2k25"]
ALL_OS = CLIENT_OS + SERVER_OS
# Server 2008 R2 and later are x64 only; 32-bit drivers exist for client releases
# up to Windows 10 and for Server 2008. ARM64 builds exist for Windows 10/11.
X86_OS = {"w7", "w8", "w8.1", "w10", "2k8"}
ARM64_OS = {"w10", "w11"}


@dataclass(frozen=True)
class FakeDriver:
    folder: str  # top-level folder in the pack (its real name)
    file: str  # base name of .inf/.sys/.cat
    service: str  # AddService name
    template: str  # virtio_win_data/<template>.inf.in
    kind: str  # words in descriptions
    legacy: str = ""  # legacy PCI device id (hex)
    modern: str = ""  # modern PCI device id (hex)
    subsys: str = ""  # legacy subsystem id (hex, 4 digits)
    os_folders: tuple[str, ...] = tuple(ALL_OS)
    extra_files: tuple[str, ...] = ()


DRIVERS: list[FakeDriver] = [
    FakeDriver("viostor", "viostor", "viostor", "storage", "Block", "1001", "1042", "0002"),
    FakeDriver("vioscsi", "vioscsi", "vioscsi", "storage", "SCSI pass-through", "1004", "1048", "0008"),
    FakeDriver("NetKVM", "netkvm", "netkvm", "net", "Ethernet", "1000", "1041", "0001"),
    FakeDriver("Balloon", "balloon", "BALLOON", "system", "Balloon", "1002", "1045", "0005",
               extra_files=("blnsvr.exe",)),
    FakeDriver("vioserial", "vioser", "VirtioSerial", "system", "Serial", "1003", "1043", "0003"),
    # viorng was never built for Server 2025 / Windows 11 ARM in this fake: not every
    # driver exists for every release, and the planner must cope.
    FakeDriver("viorng", "viorng", "VirtRng", "system", "RNG", "1005", "1044", "0004",
               os_folders=tuple(o for o in ALL_OS if o != "2k25"), extra_files=("viorngci.dll",)),
    # pvpanic appeared with Windows 8.1 / Server 2012 R2 support.
    FakeDriver("pvpanic", "pvpanic", "pvpanic", "system", "pvpanic", "", "", "",
               os_folders=("w8.1", "w10", "w11", "2k12R2", "2k16", "2k19", "2k22", "2k25")),
]

ARCH_DECORATION = {"amd64": "NTamd64", "x86": "NTx86", "ARM64": "NTarm64"}


def arches_for(os_folder: str) -> list[str]:
    arches = ["amd64"]
    if os_folder in X86_OS:
        arches.append("x86")
    if os_folder in ARM64_OS:
        arches.append("ARM64")
    return arches


def _decoration(os_folder: str, arch: str) -> str:
    base = ARCH_DECORATION[arch]
    # Windows 10-family INFs in virtio-win carry a minimum build in the decoration.
    if os_folder in ("w10", "w11", "2k16", "2k19", "2k22", "2k25"):
        return f"{base}.10.0...14393"
    return base


def _model_lines(drv: FakeDriver) -> str:
    desc = f"%{drv.service}.DeviceDesc%"
    if drv.folder == "pvpanic":
        return (f"{desc} = {drv.service}_Device, ACPI\\QEMU0001\n"
                f"{desc} = {drv.service}_Device, PCI\\VEN_1B36&DEV_0011&SUBSYS_11001AF4&REV_01, PCI\\VEN_1B36&DEV_0011")
    return (f"{desc} = {drv.service}_Device, PCI\\VEN_1AF4&DEV_{drv.legacy}&SUBSYS_{drv.subsys}1AF4&REV_00, "
            f"PCI\\VEN_1AF4&DEV_{drv.legacy}\n"
            f"{desc} = {drv.service}_Device, PCI\\VEN_1AF4&DEV_{drv.modern}&SUBSYS_11001AF4&REV_01, "
            f"PCI\\VEN_1AF4&DEV_{drv.modern}")


def render_inf(drv: FakeDriver, os_folder: str, arch: str, version: str, date: str) -> str:
    text = (DATA / f"{drv.template}.inf.in").read_text()
    models = drv.service if drv.template == "system" else {"storage": drv.file.capitalize(),
                                                              "net": "Kvmnet6"}[drv.template]
    subs = {
        "FILE": drv.file,
        "SERVICE": drv.service,
        "KIND": drv.kind,
        "MODELS": models,
        "DESCKEY": f"{drv.file.capitalize()}.DeviceDesc",
        "DECORATION": _decoration(os_folder, arch),
        "LEGACY": drv.legacy,
        "MODERN": drv.modern,
        "SUBSYS": drv.subsys,
        "BUSTYPE": "0x0000000A" if drv.folder == "vioscsi" else "0x00000001",
        "DATE": date,
        "VERSION": version,
        "MODELLINES": _model_lines(drv) if drv.template == "system" else "",
    }
    for key, value in subs.items():
        text = text.replace(f"@@{key}@@", value)
    # INF files are CRLF text on the real media.
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


def fake_blob(tag: str, drv: str, os_folder: str, arch: str, version: str, size: int = 4096) -> bytes:
    """Recognisable padded content: a test greps the first line to see which file landed."""
    head = f"H2K-FAKE-{tag} {drv} {os_folder} {arch} {version}\n".encode()
    return head + b"\0" * max(0, size - len(head))


def _write_tree(root: Path, version: str, release: str, date: str) -> None:
    for drv in DRIVERS:
        for os_folder in drv.os_folders:
            for arch in arches_for(os_folder):
                d = root / drv.folder / os_folder / arch
                d.mkdir(parents=True)
                (d / f"{drv.file}.inf").write_bytes(render_inf(drv, os_folder, arch, version, date).encode("ascii"))
                (d / f"{drv.file}.sys").write_bytes(fake_blob("DRIVER", drv.file, os_folder, arch, version))
                (d / f"{drv.file}.cat").write_bytes(fake_blob("CATALOG", drv.file, os_folder, arch, version, 1024))
                (d / f"{drv.file}.pdb").write_bytes(fake_blob("PDB", drv.file, os_folder, arch, version, 512))
                for extra in drv.extra_files:
                    (d / extra).write_bytes(fake_blob("FILE", extra, os_folder, arch, version, 1024))
    ga = root / "guest-agent"
    ga.mkdir()
    ole_magic = bytes.fromhex("d0cf11e0a1b11ae1")  # MSI files are OLE compound documents
    for msi, arch in (("qemu-ga-x86_64.msi", "x86_64"), ("qemu-ga-i386.msi", "i386")):
        (ga / msi).write_bytes(ole_magic + fake_blob("MSI", "qemu-ga", "any", arch, release, 2048))
    (root / "virtio-win_license.txt").write_text("H2K fake virtio-win pack for tests; contains no drivers.\r\n")
    (root / "data").mkdir()
    (root / "data" / "info.json").write_text(
        '{"release": "%s", "driver_version": "%s", "fake": true}\n' % (release, version))


def _recipe(version: str, release: str, date: str) -> dict:
    return {"kind": "virtio-win", "version": version, "release": release, "date": date,
            "templates": {p.name: p.read_text() for p in sorted(DATA.glob("*.inf.in"))}}


def build_tree(version: str = DEFAULT_VERSION, release: str = DEFAULT_RELEASE, date: str = DEFAULT_DATE) -> Path:
    """Return the directory of a fake virtio-win tree (cached per recipe)."""
    import lab.testbed.virtio_win as me

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        _write_tree(tmp, version, release, date)

    return cache.cached_build("virtio-win-tree", _recipe(version, release, date), build, modules=[me])


def build_iso(version: str = DEFAULT_VERSION, release: str = DEFAULT_RELEASE, date: str = DEFAULT_DATE) -> Path:
    """Return an ISO 9660 (Joliet + Rock Ridge) image of the tree, volume id ``virtio-win-<release>``."""
    import lab.testbed.virtio_win as me

    tree = build_tree(version, release, date)

    def build(tmp: Path) -> None:
        subprocess.run(
            ["xorriso", "-report_about", "SORRY", "-outdev", str(tmp), "-volid", f"virtio-win-{release}",
             "-joliet", "on", "-rockridge", "on", "-map", str(tree), "/"],
            check=True, capture_output=True,
        )

    return cache.cached_build("virtio-win-iso", _recipe(version, release, date), build, suffix=".iso", modules=[me])


def builders() -> dict[str, Callable[[], Path]]:
    return {
        "virtio-win-tree": build_tree,
        "virtio-win-iso": build_iso,
        "virtio-win-candidate-tree": lambda: build_tree(CANDIDATE_VERSION, CANDIDATE_RELEASE, CANDIDATE_DATE),
        "virtio-win-candidate-iso": lambda: build_iso(CANDIDATE_VERSION, CANDIDATE_RELEASE, CANDIDATE_DATE),
    }
