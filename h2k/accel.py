"""The one place that decides how QEMU and libguestfs are accelerated.

KVM where it really works, TCG otherwise. "/dev/kvm exists" is not enough:
on some hosts (nested or paravirtual KVM) ordinary guests hang right after the
firmware. So the decision comes from a short real boot under KVM -- the host's
own kernel with a two-file initramfs that prints a marker on the serial port --
with a deadline. The result is cached per host (kernel, QEMU version, CPU).

Override with H2K_ACCEL=kvm|tcg. Every decision is logged once per process
with its reason, so a slow TCG run never looks like a hang without a cause.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from h2k import cpio

log = logging.getLogger("h2k.accel")

PROBE_MARKER = b"H2K-KVM-PROBE-OK"
PROBE_VERSION = 1
DEFAULT_PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class AccelDecision:
    accel: str  # "kvm" or "tcg"
    reason: str
    source: str  # "env", "probe", "cache"

    @property
    def is_kvm(self) -> bool:
        return self.accel == "kvm"

    def qemu_args(self) -> list[str]:
        """QEMU arguments for this accelerator, including a matching CPU model."""
        if self.is_kvm:
            return ["-accel", "kvm", "-cpu", "host"]
        # max gives TCG the richest CPU it can emulate (x2apic, etc.).
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]

    def libguestfs_env(self) -> dict[str, str]:
        env = {"LIBGUESTFS_BACKEND": "direct"}
        if not self.is_kvm:
            env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        return env

    def libvirt_domain_type(self) -> str:
        return "kvm" if self.is_kvm else "qemu"

    def describe(self) -> str:
        return f"accelerator {self.accel} ({self.source}): {self.reason}"


_decided: AccelDecision | None = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hyper2kvm"


def _qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def _probe_kernel() -> str | None:
    own = f"/boot/vmlinuz-{platform.release()}"
    if os.access(own, os.R_OK):
        return own
    found = sorted(k for k in glob.glob("/boot/vmlinuz-*") if os.access(k, os.R_OK))
    return found[-1] if found else None


def _busybox() -> str | None:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(cand, os.X_OK):
            return cand
    return None


def _host_key(qemu: str, kernel: str) -> str:
    try:
        qver = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        qver = "?"
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line
                break
    except OSError:
        pass
    raw = "|".join([str(PROBE_VERSION), platform.node(), platform.release(), qver.splitlines()[0] if qver else "", kernel, cpu])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def probe_initramfs(busybox: str, marker: bytes = PROBE_MARKER) -> bytes:
    init = (
        "#!/bin/busybox sh\n"
        "/bin/busybox mkdir -p /dev\n"
        "/bin/busybox mount -t devtmpfs dev /dev\n"
        f"/bin/busybox echo {marker.decode()} > /dev/ttyS0\n"
        "/bin/busybox poweroff -f\n"
    )
    return cpio.archive(
        [
            cpio.directory("bin"),
            cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755),
            cpio.file("init", init.encode(), 0o755),
        ]
    )


def run_probe(timeout: float = DEFAULT_PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot a tiny Linux guest under KVM. Returns (works, reason)."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    qemu, kernel, busybox = _qemu_binary(), _probe_kernel(), _busybox()
    if not qemu:
        return False, "qemu-system-x86_64 not found"
    if not kernel or not busybox:
        return False, "cannot probe KVM (need a readable /boot/vmlinuz-* and busybox-static)"
    with tempfile.TemporaryDirectory(prefix="h2k-accel-") as tmp:
        initrd = Path(tmp) / "probe.cpio.gz"
        initrd.write_bytes(probe_initramfs(busybox))
        cmd = [
            qemu, "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults", "-display", "none",
            "-no-reboot", "-kernel", kernel, "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1", "-serial", "stdio",
        ]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seen = b""
        try:
            assert proc.stdout is not None
            while time.monotonic() - start < timeout:
                ready, _, _ = select.select([proc.stdout], [], [], 0.5)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    seen = (seen + chunk)[-8192:]
                    if PROBE_MARKER in seen:
                        return True, f"a probe guest booted under KVM in {time.monotonic() - start:.1f}s"
            tail = seen.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return False, (
                f"/dev/kvm is present but a probe guest did not reach its marker within "
                f"{timeout:.0f}s under KVM (last output: {tail[0][:120]!r})"
            )
        finally:
            proc.kill()
            proc.wait()


def decide(refresh: bool = False, announce: bool = True) -> AccelDecision:
    """Decide once per process; H2K_ACCEL wins, then the per-host cache, then a probe."""
    global _decided
    if _decided is not None and not refresh:
        return _decided
    forced = os.environ.get("H2K_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        decision = AccelDecision(forced, "forced by H2K_ACCEL", "env")
    elif forced:
        from h2k.errors import InputError

        raise InputError(f"H2K_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
    else:
        decision = _cached_or_probe(refresh)
    _decided = decision
    if announce:
        print(f"h2k: {decision.describe()}", file=sys.stderr, flush=True)
    return decision


def _cached_or_probe(refresh: bool) -> AccelDecision:
    # Parallel processes (test workers) wait for one probe instead of each running it.
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".accel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached_or_probe_locked(refresh)


def _cached_or_probe_locked(refresh: bool) -> AccelDecision:
    qemu, kernel = _qemu_binary(), _probe_kernel()
    key = _host_key(qemu, kernel) if qemu and kernel else None
    cache_file = cache_dir() / "accel.json"
    if key and not refresh:
        try:
            data = json.loads(cache_file.read_text())
            if data.get("key") == key:
                return AccelDecision(data["accel"], data["reason"], "cache")
        except (OSError, ValueError, KeyError):
            pass
    timeout = float(os.environ.get("H2K_ACCEL_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT))
    works, reason = run_probe(timeout)
    decision = AccelDecision("kvm" if works else "tcg", reason if works else f"falling back to TCG: {reason}", "probe")
    if key:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, **asdict(decision)}))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return decision


def apply_libguestfs_env() -> AccelDecision:
    """Set the libguestfs environment for this process from the decision."""
    decision = decide()
    for k, v in decision.libguestfs_env().items():
        os.environ[k] = v
    if decision.is_kvm and os.environ.get("LIBGUESTFS_BACKEND_SETTINGS") == "force_tcg":
        del os.environ["LIBGUESTFS_BACKEND_SETTINGS"]
    return decision
