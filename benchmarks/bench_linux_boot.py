"""Boot time of the stock Debian test guests under the host's accelerator (TCG here): BIOS and UEFI.

For each firmware: the fixed guest on virtio-blk to the serial login prompt (systemd's
serial getty: the boot only), to the prompt with the guest-agent network check, plus the
unfixed guest on virtio-blk until the lab scores the failure (initramfs-tools' 30 s root wait). Printed as a table with the ratio
to the BIOS virtio-blk boot measured in the same run. ``H2K_BENCH_REPEAT`` (default 1)
repeats each cell and reports the median.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from h2k import accel  # noqa: E402
from h2k.profile import MachineProfile  # noqa: E402
from lab.boot import Expect, boot  # noqa: E402
from lab.testbed import linux_guest  # noqa: E402


def _one(disk: Path, firmware: str, bus: str, expect: Expect) -> tuple[str, float]:
    profile = MachineProfile(name=f"bench-{firmware}-{bus}", firmware=firmware, disk_bus=bus, nic_model="virtio-net", hyperv=False)
    with tempfile.TemporaryDirectory(prefix="h2k-bench-") as out:
        t0 = time.monotonic()
        result = boot(disk, profile, timeout=900, outdir=Path(out), expect=expect)
        return result.verdict, time.monotonic() - t0


def main() -> int:
    repeat = int(os.environ.get("H2K_BENCH_REPEAT", "1"))
    decision = accel.decide(announce=False)
    rows = []
    for firmware in ("bios", "uefi"):
        fixed, _ = linux_guest.fixed_disk(firmware)
        unfixed = linux_guest.build_disk(firmware)
        cells = [
            ("fixed, login", fixed, "virtio-blk", Expect.for_os("linux", success=[["login"]])),
            ("fixed, login + agent network", fixed, "virtio-blk",
             Expect.for_os("linux", success=[["agent", "login", "network"]])),
            ("unfixed, until scored failed", unfixed, "virtio-blk", Expect.for_os("linux", success=[["login"]])),
        ]
        for label, disk, bus, expect in cells:
            runs = [_one(disk, firmware, bus, expect) for _ in range(repeat)]
            rows.append((firmware, label, bus, runs[-1][0], statistics.median(t for _, t in runs)))
    base = rows[0][4]
    print(f"accelerator: {getattr(decision, 'accel', decision)}; cores: {os.cpu_count()}; load: {os.getloadavg()[0]:.1f}")
    print(f"{'firmware':8} {'case':32} {'bus':11} {'verdict':8} {'seconds':>8} {'ratio':>6}")
    for firmware, label, bus, verdict, secs in rows:
        print(f"{firmware:8} {label:32} {bus:11} {verdict:8} {secs:8.1f} {secs / base:6.2f}")
    expected = {"fixed, login": "passed", "fixed, login + agent network": "passed", "unfixed, until scored failed": "failed"}
    return 0 if all(v == expected[label] for _, label, _, v, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
