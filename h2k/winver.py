"""Map what inspection found (product, build, server/client, arch) to virtio-win folders.

virtio-win ships one driver build per Windows release: ``<driver>/<os>/<arch>``.
The release is decided by the *build number*, not the product name: Windows 11
still says "Windows 10 ..." in ProductName, and Windows Server releases share
major/minor 10.0 with Windows 10/11. Unknown builds are an error, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from h2k.errors import InputError

# Windows Server on the 10.0 kernel, by build (Microsoft's release-information pages).
# Semi-Annual Channel releases use the drivers of the newest LTSC release they are
# not older than (a driver built for an older target runs on a newer build).
SERVER_BUILDS: dict[int, tuple[str, str]] = {
    14393: ("2k16", "Windows Server 2016 (1607)"),
    16299: ("2k16", "Windows Server, version 1709 (SAC)"),
    17134: ("2k16", "Windows Server, version 1803 (SAC)"),
    17763: ("2k19", "Windows Server 2019 (1809)"),
    18362: ("2k19", "Windows Server, version 1903 (SAC)"),
    18363: ("2k19", "Windows Server, version 1909 (SAC)"),
    19041: ("2k19", "Windows Server, version 2004 (SAC)"),
    19042: ("2k19", "Windows Server, version 20H2 (SAC)"),
    20348: ("2k22", "Windows Server 2022 (21H2)"),
    25398: ("2k22", "Windows Server, version 23H2 (annual channel)"),
    26100: ("2k25", "Windows Server 2025 (24H2)"),
}

# Pre-10 releases by build: (client folder, server folder, name).
NT6_BUILDS: dict[int, tuple[str, str, str]] = {
    6000: ("2k8", "2k8", "Windows Vista RTM / Server 2008 (6.0)"),
    6001: ("2k8", "2k8", "Windows Vista SP1 / Server 2008 (6.0)"),
    6002: ("2k8", "2k8", "Windows Vista SP2 / Server 2008 SP2 (6.0)"),
    6003: ("2k8", "2k8", "Windows Server 2008 SP2 (6.0, 2019+ updates)"),
    7600: ("w7", "2k8R2", "Windows 7 / Server 2008 R2 (6.1)"),
    7601: ("w7", "2k8R2", "Windows 7 SP1 / Server 2008 R2 SP1 (6.1)"),
    9200: ("w8", "2k12", "Windows 8 / Server 2012 (6.2)"),
    9600: ("w8.1", "2k12R2", "Windows 8.1 / Server 2012 R2 (6.3)"),
}
NT6_VERSION = {6000: (6, 0), 6001: (6, 0), 6002: (6, 0), 6003: (6, 0), 7600: (6, 1), 7601: (6, 1),
               9200: (6, 2), 9600: (6, 3)}

# Client Windows on 10.0: every build from 10240 (1507) up to 21999 is Windows 10;
# 22000 (21H2) and later is Windows 11 (24H2 = 26100, 25H2 = 26200). Builds above
# the newest known Windows 11 family are refused until someone checks them.
W10_FIRST, W11_FIRST, W11_LAST = 10240, 22000, 27999

ARCH_FOLDERS = {
    "x86_64": "amd64", "amd64": "amd64", "x64": "amd64",
    "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86", "x86": "x86",
    "aarch64": "ARM64", "arm64": "ARM64",
}


@dataclass(frozen=True)
class WinRelease:
    os_folder: str  # virtio-win OS folder, e.g. 2k19, w11
    arch_folder: str  # amd64, x86, ARM64
    name: str  # human name, e.g. "Windows Server 2019 (1809)"
    is_server: bool
    nt_version: tuple[int, int]  # kernel version, e.g. (10, 0)


def arch_folder(arch: str) -> str:
    try:
        return ARCH_FOLDERS[arch.strip().lower()]
    except KeyError:
        raise InputError(f"unsupported Windows architecture {arch!r} (expected x86_64, i386 or aarch64)") from None


def looks_like_server(product_name: str, edition: str | None, is_server: bool = False) -> bool:
    """Server if inspection said so, or ProductName/EditionID say it ("Windows Server 2019 ...", "ServerStandard")."""
    if is_server:
        return True
    if "server" in (product_name or "").lower():
        return True
    return (edition or "").lower().startswith("server")


def resolve(product_name: str, build: int, arch: str, *, major: int | None = None, minor: int | None = None,
            edition: str | None = None, is_server: bool = False) -> WinRelease:
    """Choose the virtio-win OS and arch folders for a Windows installation.

    Raises InputError for builds we cannot place (too old, unknown Server build,
    client build beyond the known Windows 11 range) or an unknown architecture.
    """
    server = looks_like_server(product_name, edition, is_server)
    arch_dir = arch_folder(arch)
    if build in NT6_BUILDS:
        client_dir, server_dir, name = NT6_BUILDS[build]
        nt = NT6_VERSION[build]
        if major is not None and major >= 10:
            raise InputError(f"inconsistent version: build {build} is NT {nt[0]}.{nt[1]} but major version is {major}")
        return WinRelease(server_dir if server else client_dir, arch_dir, name, server, nt)
    if build < W10_FIRST:
        raise InputError(
            f"unknown Windows build {build} ({product_name!r}): not a released NT 6.x/10.0 build; "
            "virtio-win has no drivers for Windows before Vista/2008")
    if major is not None and major < 10 and not (major == 6 and minor == 3):
        # Windows 10+ keeps CurrentVersion = 6.3 for compatibility; anything else is a contradiction.
        raise InputError(f"inconsistent version: build {build} is NT 10.0 but version is {major}.{minor}")
    if server:
        if build not in SERVER_BUILDS:
            known = ", ".join(f"{b} ({f})" for b, (f, _) in sorted(SERVER_BUILDS.items()))
            raise InputError(f"unknown Windows Server build {build} ({product_name!r}); known builds: {known}")
        folder, name = SERVER_BUILDS[build]
        return WinRelease(folder, arch_dir, name, True, (10, 0))
    if build < W11_FIRST:
        return WinRelease("w10", arch_dir, f"Windows 10 (build {build})", False, (10, 0))
    if build <= W11_LAST:
        return WinRelease("w11", arch_dir, f"Windows 11 (build {build})", False, (10, 0))
    raise InputError(f"unknown Windows client build {build} ({product_name!r}): newer than any known Windows 11 build")


def resolve_facts(facts) -> WinRelease:
    """``resolve`` for a ``h2k.facts.WindowsFacts``."""
    return resolve(facts.product_name, facts.build, facts.arch, major=facts.major, minor=facts.minor,
                   edition=facts.edition, is_server=facts.is_server)
