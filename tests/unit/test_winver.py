"""h2k.winver: facts -> virtio-win OS/arch folder, by build number."""

from __future__ import annotations

import pytest

from h2k import winver
from h2k.errors import InputError

# (product name as in SOFTWARE, edition, build, server?, expected folder).
# Builds from Microsoft's release-information pages and the hcsshim osversion
# constants (RS1 = 14393 = ltsc2016, RS5 = 17763 = ltsc2019, 20348 = ltsc2022, ...).
PUBLIC_TABLE = [
    ("Windows Vista (TM) Business", "Business", 6002, False, "2k8"),
    ("Windows Server (R) 2008 Standard", "ServerStandard", 6002, True, "2k8"),
    ("Windows 7 Professional", "Professional", 7601, False, "w7"),
    ("Windows Server 2008 R2 Standard", "ServerStandard", 7601, True, "2k8R2"),
    ("Windows 8 Pro", "Professional", 9200, False, "w8"),
    ("Windows Server 2012 Datacenter", "ServerDatacenter", 9200, True, "2k12"),
    ("Windows 8.1 Pro", "Professional", 9600, False, "w8.1"),
    ("Windows Server 2012 R2 Standard", "ServerStandard", 9600, True, "2k12R2"),
    ("Windows 10 Pro", "Professional", 10240, False, "w10"),
    ("Windows 10 Enterprise LTSC 2019", "EnterpriseS", 17763, False, "w10"),
    ("Windows 10 Pro", "Professional", 19045, False, "w10"),
    ("Windows Server 2016 Standard", "ServerStandard", 14393, True, "2k16"),
    ("Windows Server Datacenter", "ServerDatacenterACor", 16299, True, "2k16"),
    ("Windows Server 2019 Standard", "ServerStandard", 17763, True, "2k19"),
    ("Windows Server Standard", "ServerStandardCor", 19042, True, "2k19"),
    ("Windows Server 2022 Datacenter", "ServerDatacenter", 20348, True, "2k22"),
    ("Windows Server 2025 Standard", "ServerStandard", 26100, True, "2k25"),
    # Windows 11 keeps "Windows 10" in ProductName; the build decides.
    ("Windows 10 Pro", "Professional", 22000, False, "w11"),
    ("Windows 10 Pro", "Professional", 22631, False, "w11"),
    ("Windows 10 Enterprise", "Enterprise", 26100, False, "w11"),
]


@pytest.mark.parametrize("product,edition,build,server,folder", PUBLIC_TABLE)
def test_public_build_table(product, edition, build, server, folder):
    rel = winver.resolve(product, build, "x86_64", edition=edition, is_server=False)
    assert rel.os_folder == folder
    assert rel.is_server == server  # derived from ProductName/EditionID alone
    assert rel.arch_folder == "amd64"


def test_build_26100_depends_on_server_or_client():
    assert winver.resolve("Windows 10 Pro", 26100, "x86_64").os_folder == "w11"
    assert winver.resolve("Windows Server 2025 Datacenter", 26100, "x86_64").os_folder == "2k25"
    assert winver.resolve("Windows Server", 26100, "x86_64", is_server=True).os_folder == "2k25"


@pytest.mark.parametrize("arch,folder", [("x86_64", "amd64"), ("i386", "x86"), ("i686", "x86"),
                                         ("aarch64", "ARM64"), ("AMD64", "amd64")])
def test_arch_folders(arch, folder):
    assert winver.resolve("Windows 10 Pro", 19045, arch).arch_folder == folder


def test_windows10_registry_reports_63_is_accepted():
    # CurrentVersion stays "6.3" on Windows 10+ for application compatibility.
    assert winver.resolve("Windows 10 Pro", 19045, "x86_64", major=6, minor=3).os_folder == "w10"


@pytest.mark.parametrize("product,build,server", [
    ("Windows XP Professional", 2600, False),
    ("Windows Server 2003", 3790, True),
    ("Windows Server Insider", 25982, True),  # not a known Server build
    ("Windows Server 2019", 17764, True),
    ("Windows 10 Pro", 31000, False),  # beyond the known Windows 11 family
    ("Windows 10 Pro", 8000, False),
])
def test_unknown_builds_are_input_errors(product, build, server):
    with pytest.raises(InputError, match=str(build)):
        winver.resolve(product, build, "x86_64", is_server=server)


def test_unknown_arch_is_input_error():
    with pytest.raises(InputError, match="ppc64"):
        winver.resolve("Windows 10 Pro", 19045, "ppc64")


def test_contradictory_version_is_input_error():
    with pytest.raises(InputError, match="inconsistent"):
        winver.resolve("Windows 7", 7601, "x86_64", major=10, minor=0)
    with pytest.raises(InputError, match="inconsistent"):
        winver.resolve("Windows 10", 19045, "x86_64", major=6, minor=1)
