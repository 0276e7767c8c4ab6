"""QEMU with least privilege: a seccomp sandbox, an unprivileged user, and only the files it needs.

A guest disk is untrusted and QEMU is a large program parsing it, so the lab's
QEMU is confined the way libvirt confines its own:

* ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny``
  (seccomp: no set*uid, no fork/exec, no scheduler or resource changes);
* when the lab runs as root, QEMU is started as the unprivileged system user
  ``h2k-qemu`` (``H2K_QEMU_USER`` names another; ``make setup`` creates it). The
  lab drops to it before exec: QEMU 7.2's ``-runas`` changes user *after* the
  sandbox is installed, so with ``elevateprivileges=deny`` it dies on its own
  setuid (measured: "Bad system call");
* QEMU opens no path of the lab's: every file it needs (each layer of the disk,
  ISOs, firmware, NVRAM, logs, the screendump) is opened by the lab and handed
  over as a file descriptor in an fd set (``-add-fd``, ``/dev/fdset/N``), the
  sockets are passed as descriptors too, and a direct-boot kernel and initrd are
  copied into a folder of the boot's private directory that only that user may
  read. The one exception: the extents of a multi-file VMDK, which QEMU opens by
  name next to their descriptor (convert such a disk first, or make its folder
  readable by the QEMU user).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from h2k.errors import H2KError
from h2k.profile import MachineProfile

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
DEFAULT_USER = "h2k-qemu"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class QemuUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (e.g. kvm, for /dev/kvm)


def qemu_user() -> QemuUser | None:
    """The user QEMU runs as: None when the lab is not root (it runs as the lab's own user)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("H2K_QEMU_USER") or DEFAULT_USER
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise H2KError(f"the lab runs QEMU as the unprivileged user {name!r} when started as root, and there is "
                       f"no such user: create it ('make setup' does: useradd --system --no-create-home "
                       f"--shell /usr/sbin/nologin {name}) or name another with H2K_QEMU_USER") from None
    if pw.pw_uid == 0:
        raise H2KError(f"H2K_QEMU_USER={name!r} is root; QEMU must run unprivileged")
    return QemuUser(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))


def child_setup(user: QemuUser | None):
    """The preexec function for QEMU: drop to ``user`` (if any), then die with the lab.

    PR_SET_PDEATHSIG is cleared by a change of credentials, so it is set after the drop.
    """
    def setup() -> None:
        if user is not None:
            os.setgroups(list(user.groups))
            os.setgid(user.gid)
            os.setuid(user.uid)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    return setup


def private_kernel(profile: MachineProfile, workdir: Path, user: QemuUser | None) -> tuple[MachineProfile, list[int]]:
    """QEMU reads -kernel/-initrd by name, not through fd sets: an unprivileged QEMU gets copies only it
    may read, opened by the lab and named ``/proc/self/fd/N`` (QEMU inherits fd N; opening that link
    checks the copy's own permissions, not the lab's folders). Returns the profile and the fds to pass."""
    if user is None or not (profile.kernel or profile.initrd):
        return profile, []
    names: dict[str, str] = {}
    fds: list[int] = []
    for key in ("kernel", "initrd"):
        src = getattr(profile, key)
        if src:
            dest = workdir / f"qemu-{key}"
            shutil.copyfile(src, dest)
            os.chown(dest, user.uid, user.gid)
            os.chmod(dest, 0o400)
            fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            names[key] = f"/proc/self/fd/{fd}"
    return replace(profile, **names), fds


def process_status(pid: int) -> dict[str, str]:
    """Who a process runs as and how it is confined, from /proc/PID/status (evidence of a boot)."""
    wanted = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters", "CapEff")
    out: dict[str, str] = {"pid": str(pid)}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = " ".join(value.split())
    except OSError:
        pass
    return out
