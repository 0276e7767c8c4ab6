"""``h2k fix`` against a bare read-only libguestfs inspection of the same image, in the same run.

The baseline is what any libguestfs tool pays: launch the appliance read-only,
``inspect_os``, close. ``h2k fix`` (overlay output, driver pack, EMS) inspects,
plans and applies in the same single launch; target: fix <= 1.5 x baseline.
Runs alternate (baseline, fix, baseline, fix ...) so load drifts hit both alike.

    python benchmarks/bench_fix.py [VARIANT] [ROUNDS]      (default win2019-bios 2)

It also counts the appliance calls one fix makes (all, and ``tar_in``), so a
regression to per-file round trips shows up as a number, not only as time.
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.5


def bare_inspection(image: Path) -> float:
    import guestfs

    from h2k import accel

    accel.apply_libguestfs_env()
    t0 = time.monotonic()
    g = guestfs.GuestFS(python_return_dict=True)
    g.add_drive_opts(str(image), readonly=1)
    g.launch()
    roots = g.inspect_os()
    for root in roots:
        g.inspect_get_product_name(root)
    g.close()
    return time.monotonic() - t0


class CountingGuest:
    """A libguestfs handle that counts the calls made through it (each one is a round trip)."""

    def __init__(self, g, counts: collections.Counter) -> None:
        self._g, self._counts = g, counts

    def __getattr__(self, name: str):
        attr = getattr(self._g, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._counts[name] += 1
            return attr(*args, **kwargs)

        return call


def one_fix(image: Path, pack, out_dir: Path, n: int, counts: collections.Counter) -> float:
    from h2k import fix as fixmod
    from h2k.fix import fix_image
    from h2k.plan import build_plan

    real_open = fixmod.open_guest

    def counted_open(*args, **kwargs):
        return CountingGuest(real_open(*args, **kwargs), counts)

    out = out_dir / f"fixed-{n}.qcow2"
    fixmod.open_guest = counted_open
    t0 = time.monotonic()
    try:
        report = fix_image(image, lambda facts: build_plan(facts, pack, "virtio-blk"), output=out, ems=True)
    finally:
        fixmod.open_guest = real_open
    took = time.monotonic() - t0
    counts["files written"] += len(report.files_written)
    assert not report.nothing_to_do and report.registry_changes > 0
    out.unlink()
    Path(report.journal).unlink()
    return took


def main(argv: list[str] | None = None) -> int:
    argv = [] if argv is None else argv  # benchmarks/run.py calls main() with no arguments
    variant = argv[0] if argv else "win2019-bios"
    rounds = int(argv[1]) if len(argv) > 1 else 2
    import os

    os.environ.setdefault("H2K_QUIET", "1")
    from h2k.driverpack import open_pack
    from lab.testbed import virtio_win, windisk

    image = windisk.build(variant)
    pack = open_pack(virtio_win.build_tree())
    base, fix = [], []
    with tempfile.TemporaryDirectory(prefix="h2k-bench-fix-") as tmp:
        for n in range(rounds):
            base.append(bare_inspection(image))
            counts: collections.Counter = collections.Counter()
            fix.append(one_fix(image, pack, Path(tmp), n, counts))
            print(f"round {n + 1}: inspection {base[-1]:.1f}s  fix {fix[-1]:.1f}s  "
                  f"(appliance calls {sum(v for k, v in counts.items() if k != 'files written')}, "
                  f"tar_in {counts['tar_in']}, files written {counts['files written']})", flush=True)
    b, f = statistics.median(base), statistics.median(fix)
    ratio = f / b
    print(f"{'image':<16}{'inspect (s)':>12}{'fix (s)':>10}{'ratio':>8}{'target':>8}")
    print(f"{variant:<16}{b:>12.1f}{f:>10.1f}{ratio:>8.2f}{TARGET:>8.1f}  {'ok' if ratio <= TARGET else 'OVER'}")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main(sys.argv[1:]))
