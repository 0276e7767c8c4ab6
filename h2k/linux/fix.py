"""Make a Linux guest boot on VirtIO: one libguestfs launch on an overlay (or output copy).

What it does, each step only when inspection says it is needed (so a second run
has nothing to do):

1. fstab / crypttab: device names (/dev/sdX, /dev/hdX, /dev/vdX, /dev/xvdX) -> ``UUID=``.
2. VMware tools: purge the packages with the guest's dpkg (their files are kept in a tar).
3. MAC-pinned network configuration: delete udev persistent-net rules, drop ``hwaddress`` /
   ``HWADDR=`` lines (netplan / networkd matches are reported, not edited).
4. initramfs: add virtio_pci virtio_blk virtio_scsi virtio_net *and the storage/file-system
   drivers the old initramfs had* to the guest's own tool configuration, then regenerate
   every installed kernel's initramfs with that tool. In the appliance, initramfs-tools'
   ``MODULES=dep`` would size for the appliance's disk, so a temporary conf.d file sets
   ``MODULES=list`` for this run only (the explicit list is complete).
5. GRUB: stop GRUB_DISABLE_LINUX_UUID, regenerate grub.cfg with the guest's update-grub /
   grub-mkconfig and check every kernel line says ``root=UUID=``.

Every changed file is backed up inside the guest and recorded in a JSON journal
(``h2k.linux.journal``); ``h2k.linux.rollback`` restores them.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from h2k import overlay
from h2k.errors import H2KError, InputError
from h2k.journal import COMPLETE, DONE, INTENT, RUNNING, GuestJournal, host_journal_path
from h2k.linux import initrd as initrdlib
from h2k.linux.facts import LinuxFacts
from h2k.linux.inspect import VIRTIO_MODULES, inspect_handle, open_linux
from h2k.linux.journal import GUEST_BACKUP_DIR, GUEST_JOURNAL_DIR, FileChange, LinuxJournal, PackageRemoval
from h2k.progress import Progress

# Old-initramfs modules worth keeping explicitly: storage controllers, block/md, file systems.
KEEP_PATH = re.compile(r"/kernel/(drivers/(ata|scsi|block|nvme|md|message/fusion|mmc/host)|fs)/")
APPLIANCE_CONF = "/etc/initramfs-tools/conf.d/zz-hyper2kvm-appliance"
POLICY_RC_D = "/usr/sbin/policy-rc.d"
ROOT_OK = re.compile(r"^(UUID=|PARTUUID=|LABEL=|PARTLABEL=|/dev/mapper/|/dev/disk/by-|ZFS=)")


@dataclass
class LinuxFixReport:
    image: str
    output: str
    actions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    journal: str | None = None  # host path of the journal, None when nothing changed
    run_id: str | None = None
    seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return not self.actions

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nothing_to_do"] = self.nothing_to_do
        return d

    def summary(self) -> str:
        head = f"{self.image} -> {self.output}: " + (
            "nothing to do (already boot-ready on VirtIO)" if self.nothing_to_do else f"{len(self.actions)} change(s)"
        )
        lines = [head] + [f"  - {a}" for a in self.actions] + [f"  note: {n}" for n in self.notes]
        if self.journal:
            lines.append(f"  journal: {self.journal}")
        lines.append(f"  ({self.seconds:.0f}s)")
        return "\n".join(lines)


# --------------------------------------------------------------------------- planning (pure)


def needs_initramfs(facts: LinuxFacts) -> list[str]:
    """Kernels whose initramfs lacks a VirtIO module (that is not built in), or has none."""
    out = []
    for k in facts.kernels:
        if k.initrd is None or set(VIRTIO_MODULES) - set(k.initrd_modules) - set(k.builtin):
            out.append(k.version)
    return out


def root_by_uuid(root: str) -> bool:
    return bool(ROOT_OK.match(root))


def needs_grub(facts: LinuxFacts) -> bool:
    if facts.grub_cfg is None:
        return False
    return facts.grub_disable_linux_uuid or not all(root_by_uuid(r) for r in facts.grub_roots)


def plan(facts: LinuxFacts) -> list[str]:
    """What fix would do, one line each (empty: nothing to do)."""
    steps = []
    for e in facts.fstab + facts.crypttab:
        if e.by_device_name:
            steps.append(f"{e.file}: {e.spec} ({e.target}) -> UUID=")
    for p in facts.vmware_tools:
        if p.startswith("package:"):
            steps.append(f"remove VMware tools package {p.split(':', 1)[1]}")
    for p in facts.pinned_macs:
        if p.fixable:
            steps.append(f"unpin MAC {p.mac} in {p.path} ({p.kind})")
    stale = needs_initramfs(facts)
    if stale:
        steps.append(f"add VirtIO drivers to the {facts.initramfs_tool} initramfs of {', '.join(stale)}")
    if needs_grub(facts):
        steps.append(f"regenerate {facts.grub_cfg} with root=UUID=")
    return steps


def keep_modules(facts: LinuxFacts, paths: dict[str, dict[str, str]]) -> list[str]:
    """Storage and file-system modules found in any old initramfs (``paths``: kernel -> name -> path)."""
    keep = set()
    for mods in paths.values():
        keep |= {name for name, path in mods.items() if KEEP_PATH.search("/" + path)}
    return sorted(keep - set(VIRTIO_MODULES))


# --------------------------------------------------------------------------- the session


class _Session:
    """Changes to one launched guest, each backed up and journaled before it is made.

    The journal (:mod:`h2k.linux.journal`) is written and synced in the guest
    before the first change; each file is recorded (state intent, its backup
    planned) and its backup synced before the file changes.
    """

    def __init__(self, g, journal: LinuxJournal, report: LinuxFixReport, host_journal: Path | None = None) -> None:
        self.g = g
        self.journal = journal
        self.report = report
        self.host_journal = host_journal  # in place: mirrored next to the image while the run goes on
        self.log: GuestJournal | None = None
        self.backup_root = f"{GUEST_BACKUP_DIR}/{journal.run_id}"
        self._backed_up: dict[str, FileChange] = {}

    def persist(self) -> None:
        """Make the journal as it is now durable in the guest (starting it before the first change)."""
        if self.log is None:
            self.journal.state = RUNNING
            self.g.mkdir_p(GUEST_JOURNAL_DIR)
            self.log = GuestJournal(self.g, self.journal, self.journal.guest_path(), self.host_journal)
        self.log.save()

    def sha(self, path: str) -> str | None:
        return self.g.checksum("sha256", path) if self.g.is_file(path) else None

    def begin(self, path: str, why: str) -> FileChange:
        """Journal ``path`` and back it up (once per run, synced) before it changes; return its record."""
        if path in self._backed_up:
            return self._backed_up[path]
        rec = FileChange(path=path, action="created", why=why, state=INTENT)
        if self.g.is_file(path):
            rec.action, rec.backup, rec.sha256_before = "modified", self.backup_root + path, self.sha(path)
        self._backed_up[path] = rec
        self.journal.files.append(rec)
        self.persist()
        if rec.backup:
            self.g.mkdir_p(os.path.dirname(rec.backup))
            self.g.cp_a(path, rec.backup)
            self.g.sync()  # the copy is on disk before the file changes
        return rec

    def finish(self, path: str) -> None:
        rec = self._backed_up[path]
        rec.sha256_after = self.sha(path)
        if rec.sha256_after is None:
            rec.action = "deleted"
        rec.state = DONE  # saved with the next step (whose save syncs this change first)

    def write(self, path: str, text: str, why: str) -> None:
        self.begin(path, why)
        self.g.write(path, text.encode())
        self.finish(path)

    def delete(self, path: str, why: str) -> None:
        self.begin(path, why)
        self.g.rm(path)
        self.finish(path)

    def run(self, cmd: str) -> str:
        self.journal.commands.append(cmd)
        try:
            return self.g.sh(f"{cmd} 2>&1")
        except RuntimeError as exc:
            raise H2KError(f"in the guest, '{cmd}' failed: {_last_line(str(exc))}") from None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


# --------------------------------------------------------------------------- steps


def _guest_to_appliance(dev: str, g) -> str | None:
    """/dev/vdb2, /dev/hda1, /dev/xvda1 as the guest named it -> the appliance's /dev/sdXN."""
    m = re.match(r"^/dev/(?:sd|hd|vd|xvd)([a-z]+)([0-9]*)$", dev)
    if not m:
        return None
    cand = f"/dev/sd{m.group(1)}{m.group(2)}"
    return cand if cand in g.list_partitions() + g.list_devices() else None


def _uuid_of(g, dev: str) -> str | None:
    try:
        uuid = g.vfs_uuid(dev)
    except RuntimeError:
        return None
    return uuid or None


def fix_tables(sess: _Session, facts: LinuxFacts) -> None:
    g = sess.g
    for file, entries in (("/etc/fstab", facts.fstab), ("/etc/crypttab", facts.crypttab)):
        todo = [e for e in entries if e.by_device_name]
        if not todo:
            continue
        lines = g.cat(file).split("\n")
        for e in todo:
            adev = facts.mounts.get(e.target) if file == "/etc/fstab" else None
            adev = adev or _guest_to_appliance(e.spec, g)
            uuid = _uuid_of(g, adev) if adev else None
            if uuid is None:
                sess.report.notes.append(f"{file}:{e.line_no}: no UUID for {e.spec}; left as is")
                continue
            old = lines[e.line_no - 1]
            lines[e.line_no - 1] = re.sub(rf"(?<!\S){re.escape(e.spec)}(?!\S)", f"UUID={uuid}", old, count=1)
            sess.report.actions.append(f"{file}: {e.spec} -> UUID={uuid} ({e.target})")
        sess.write(file, "\n".join(lines), "device names change with the disk bus; UUIDs do not")


def remove_vmware_tools(sess: _Session, facts: LinuxFacts) -> None:
    pkgs = [p.split(":", 1)[1] for p in facts.vmware_tools if p.startswith("package:")]
    if not pkgs:
        for p in facts.vmware_tools:
            sess.report.notes.append(f"VMware tools leftover {p.split(':', 1)[1]} (not a package; left in place)")
        return
    if facts.package_format != "deb":
        sess.report.notes.append(f"VMware tools {', '.join(pkgs)} found; removal is implemented for dpkg only")
        return
    g = sess.g
    for pkg in pkgs:
        tar = f"{sess.backup_root}/package-{pkg}.tar"
        removal = PackageRemoval(pkg, tar, "VMware tools have no use on KVM and fight qemu-ga", state=INTENT)
        sess.journal.packages.append(removal)
        sess.persist()
        g.mkdir_p(sess.backup_root)
        # The package's own files (not directories) plus dpkg's records, so rollback can put it back.
        listing = f"/var/lib/hyper2kvm/.{pkg}.list"
        sess.run(
            f"{{ dpkg-query -L {shlex.quote(pkg)} | while read -r f; do [ -d \"$f\" ] || [ ! -e \"$f\" ] || echo \"$f\"; done; "
            f"ls -d /var/lib/dpkg/info/{pkg}.* /var/lib/dpkg/info/{pkg}:* 2>/dev/null; echo /var/lib/dpkg/status; }} > {listing}"
        )
        # The tar gets its name only once it is whole and on disk: rollback unpacks it only then.
        sess.run(f"tar -cpf {tar}.part --no-recursion -P -T {listing} && rm -f {listing} && sync && mv {tar}.part {tar}")
        g.sync()
        # policy-rc.d 101: maintainer scripts must not try to stop services in the appliance.
        had_policy = g.exists(POLICY_RC_D)
        if not had_policy:
            sess.begin(POLICY_RC_D, "temporary, while dpkg runs in the appliance: services must not be started")
            g.write(POLICY_RC_D, b"#!/bin/sh\nexit 101\n")
            g.chmod(0o755, POLICY_RC_D)
        try:
            sess.run(f"DEBIAN_FRONTEND=noninteractive dpkg --purge {shlex.quote(pkg)}")
        finally:
            if not had_policy:
                g.rm_f(POLICY_RC_D)
                sess.finish(POLICY_RC_D)
        removal.state = DONE
        sess.report.actions.append(f"removed VMware tools package {pkg} (files kept in {tar})")


def unpin_macs(sess: _Session, facts: LinuxFacts) -> None:
    g = sess.g
    why = "the NIC's MAC address changes with the hypervisor"
    done: set[str] = set()
    for p in facts.pinned_macs:
        if not p.fixable:
            sess.report.notes.append(f"{p.path}: matches MAC {p.mac} ({p.kind}); review it by hand")
            continue
        if p.path in done:
            continue
        done.add(p.path)
        if p.kind == "udev-rule":
            text = g.cat(p.path)
            kept = [ln for ln in text.splitlines() if not re.search(r"ATTRS?\{address\}==", ln)]
            if any(ln.strip() and not ln.lstrip().startswith("#") for ln in kept):
                sess.write(p.path, "\n".join(kept) + "\n", why)
            else:
                sess.delete(p.path, why)
        elif p.kind == "ifupdown-hwaddress":
            text = g.cat(p.path)
            sess.write(p.path, re.sub(r"(?m)^(\s*)(hwaddress\s)", r"\1# hyper2kvm: \2", text), why)
        elif p.kind == "ifcfg-hwaddr":
            text = g.cat(p.path)
            sess.write(p.path, re.sub(r"(?m)^(\s*)((?:HWADDR|MACADDR)=)", r"\1# hyper2kvm: \2", text), why)
        sess.report.actions.append(f"unpinned MAC {p.mac} in {p.path} ({p.kind})")


def _initrd_modules(g, path: str, tmp: Path) -> dict[str, str]:
    return initrdlib.modules(initrdlib.read_from_guest(g, path, tmp))


def fix_initramfs(sess: _Session, facts: LinuxFacts, tmp: Path) -> None:
    stale = needs_initramfs(facts)
    if not stale:
        return
    g = sess.g
    old = {k.version: _initrd_modules(g, k.initrd, tmp) for k in facts.kernels if k.initrd}
    wanted = VIRTIO_MODULES + keep_modules(facts, old)
    why = "VirtIO storage drivers must be in the initramfs to find the root disk on KVM"
    tool = facts.initramfs_tool
    for k in facts.kernels:  # the regenerated images replace these: keep the old ones
        if k.initrd:
            sess.begin(k.initrd, why)
    if tool == "initramfs-tools":
        path = "/etc/initramfs-tools/modules"
        text = g.cat(path) if g.is_file(path) else ""
        listed = {ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")}
        add = [m for m in wanted if m not in listed]
        if add:
            block = f"# hyper2kvm {sess.journal.run_id}: VirtIO drivers for KVM, and the old machine's storage drivers\n"
            sess.write(path, text.rstrip("\n") + "\n" + block + "\n".join(add) + "\n", why)
        # A temporary conf.d file for this run only: MODULES=dep in the appliance would size for
        # the appliance's disk (list instead: the list above is complete); a low compression
        # level because the appliance runs under TCG on hosts without KVM.
        conf = "# hyper2kvm: temporary, for regeneration in the libguestfs appliance\nCOMPRESSLEVEL=1\n"
        if facts.initramfs_modules_setting == "dep":
            conf += "MODULES=list\n"
        g.mkdir_p(os.path.dirname(APPLIANCE_CONF))
        sess.begin(APPLIANCE_CONF, "temporary, for regeneration in the libguestfs appliance")  # a crash may leave it
        g.write(APPLIANCE_CONF, conf.encode())
        try:
            sess.run("update-initramfs -u -k all")
            for k in facts.kernels:
                if not k.initrd and k.vmlinuz:
                    sess.begin(f"/boot/initrd.img-{k.version}", why)
                    sess.run(f"update-initramfs -c -k {shlex.quote(k.version)}")
        finally:
            if g.exists(APPLIANCE_CONF):
                g.rm(APPLIANCE_CONF)
            sess.finish(APPLIANCE_CONF)
    elif tool == "dracut":
        conf = "/etc/dracut.conf.d/90-hyper2kvm-virtio.conf"
        sess.write(conf, f'# hyper2kvm: VirtIO drivers for KVM, and the old machine\'s storage drivers\nadd_drivers+=" {" ".join(wanted)} "\n', why)
        for k in facts.kernels:
            target = k.initrd or f"/boot/initramfs-{k.version}.img"
            sess.begin(target, why)
            sess.run(f"dracut -f {shlex.quote(target)} {shlex.quote(k.version)}")
    elif tool == "mkinitcpio":
        path = "/etc/mkinitcpio.conf"
        text = g.cat(path)
        m = re.search(r"(?m)^MODULES=\((.*?)\)", text)
        have = m.group(1).split() if m else []
        new = have + [x for x in wanted if x not in have]
        line = f"MODULES=({' '.join(new)})"
        text = text[: m.start()] + line + text[m.end():] if m else text + "\n" + line + "\n"
        sess.write(path, text, why)
        sess.run("mkinitcpio -P")
    else:
        raise H2KError("no initramfs tool found in the guest (initramfs-tools, dracut or mkinitcpio)")
    for k in facts.kernels:
        target = k.initrd or next(
            (p for p in (f"/boot/initrd.img-{k.version}", f"/boot/initramfs-{k.version}.img") if g.exists(p)), None
        )
        if target is None:
            raise H2KError(f"{tool} made no initramfs for kernel {k.version}")
        sess.finish(target)
        got = set(_initrd_modules(g, target, tmp)) | set(k.builtin)
        missing = [m for m in VIRTIO_MODULES + keep_modules(facts, old) if m not in got]
        if missing:
            raise H2KError(f"the regenerated initramfs of {k.version} still lacks {', '.join(missing)}")
        sess.report.actions.append(f"initramfs of {k.version} regenerated with {tool}: + {', '.join(VIRTIO_MODULES)}")


def fix_grub(sess: _Session, facts: LinuxFacts) -> None:
    if not needs_grub(facts):
        return
    g = sess.g
    why = "the kernel must find its root by UUID, not by the old bus's device name"
    default = "/etc/default/grub"
    if g.is_file(default):
        text = g.cat(default)
        new = re.sub(r"(?m)^(\s*GRUB_DISABLE_LINUX_UUID=.*)$", r"# hyper2kvm: \1", text)
        root_uuid = _uuid_of(g, facts.root_device)

        def repl(m: re.Match) -> str:
            return f"root=UUID={root_uuid}" if root_uuid else m.group(0)

        new = re.sub(r"\broot=/dev/(?:sd|hd|vd|xvd)[a-z]+[0-9]*", repl, new)
        if new != text:
            sess.write(default, new, why)
    # grub-mkconfig writes root=UUID= only if /dev/disk/by-uuid/<uuid> exists; make sure it
    # does in the appliance (its /dev is the one the guest command sees).
    root_uuid = _uuid_of(g, facts.root_device)
    if root_uuid:
        g.sh(f"mkdir -p /dev/disk/by-uuid && [ -e /dev/disk/by-uuid/{root_uuid} ] || "
             f"ln -s {shlex.quote(facts.root_device)} /dev/disk/by-uuid/{root_uuid}")
    sess.begin(facts.grub_cfg, why)
    sess.run(facts.grub_mkconfig)
    sess.finish(facts.grub_cfg)
    from h2k.linux.inspect import grub_roots

    roots = grub_roots(g.cat(facts.grub_cfg))
    bad = [r for r in roots if not root_by_uuid(r)]
    if bad:
        raise H2KError(f"{facts.grub_mkconfig} still wrote root={bad[0]} in {facts.grub_cfg}")
    sess.report.actions.append(f"{facts.grub_cfg} regenerated with {facts.grub_mkconfig.split()[0]}: root={roots[0] if roots else '?'}")


# --------------------------------------------------------------------------- entry points


def fix_handle(g, root: str, image: str, report: LinuxFixReport, tmp: Path, progress: Progress,
               host_journal: Callable[[str], Path] | None = None) -> LinuxJournal | None:
    """Inspect and fix the launched, mounted guest, journalling in it as it goes. None: nothing to do.

    ``host_journal``: run id -> where to mirror the journal on the host while the run goes on (in place).
    """
    facts = inspect_handle(g, root, image, tmp)
    if not facts.kernels:
        raise InputError(f"{image}: no kernel found in the guest")
    if not plan(facts):
        for p in facts.pinned_macs:
            if not p.fixable:
                report.notes.append(f"{p.path}: matches MAC {p.mac} ({p.kind}); review it by hand")
        return None
    journal = LinuxJournal(run_id=LinuxJournal.new_run_id(), image=image)
    report.run_id = journal.run_id
    sess = _Session(g, journal, report, host_journal(journal.run_id) if host_journal else None)
    progress.step("fstab / crypttab")
    fix_tables(sess, facts)
    progress.step("VMware tools, pinned MACs")
    remove_vmware_tools(sess, facts)
    unpin_macs(sess, facts)
    progress.step(f"initramfs ({facts.initramfs_tool}; minutes under TCG)")
    fix_initramfs(sess, facts, tmp)
    progress.step("boot loader")
    fix_grub(sess, facts)
    journal.state = COMPLETE
    sess.persist()  # syncs the last step's writes before saying so
    return journal


def fix_image(
    image: str | Path,
    *_ignored,
    output: str | Path | None = None,
    in_place: bool = False,
    **_ignored_kw,
) -> LinuxFixReport:
    """Fix a Linux disk. Default: a qcow2 overlay ``<image>.h2k.qcow2`` over the untouched source;
    ``output``: a standalone copy; ``in_place``: the image itself."""
    t0 = time.monotonic()
    with overlay.fix_target(image, output, in_place) as target:
        image = Path(target.source.given)  # as the user named it
        report = LinuxFixReport(image=str(image), output=str(target.final))
        progress = Progress(f"fix {image.name}", 6)
        g, root = open_linux(target.disk, readonly=False)
        mirror = (lambda run: host_journal_path(image, run)) if in_place else None
        try:
            progress.step("launched; inspecting")
            with tempfile.TemporaryDirectory(prefix="h2k-linux-fix-") as tmp:
                journal = fix_handle(g, root, str(image), report, Path(tmp), progress, mirror)
            g.umount_all()
            g.shutdown()
        except BaseException as exc:
            if in_place and report.run_id and host_journal_path(image, report.run_id).exists():
                hint = f"{image} was partly changed: 'h2k rollback {image}' undoes it"
                if isinstance(exc, H2KError):
                    exc.args = (f"{exc}; {hint}",)
                else:
                    print(f"h2k: {hint}", file=sys.stderr)
            raise
        finally:
            g.close()  # after an interrupt too: unmounts and syncs before the appliance stops
    if journal is not None:
        report.journal = str(journal_path := host_journal_path(target.final, journal.run_id))
        if not in_place:  # (in place, the mirror is already there)
            journal_path.write_text(journal.to_json())
    progress.done()
    report.seconds = time.monotonic() - t0
    return report
