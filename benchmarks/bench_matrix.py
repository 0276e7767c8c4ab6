"""Matrix throughput: N cells with j workers against the same N cells one at a time.

Cells are real boots of the lab's tiny test guest (``lab.tinyguest``, a disk that
prints H2K-BOOT-OK) through the real runner and executor (``--no-fix``: the
guest needs no fix, so the numbers are the runner's, not the engine's).

Reported:
* parallel efficiency = T(N cells, 1 worker) / (j × T(N cells, j workers)); the
  target is >= 0.85 where the cores allow (j <= cores, TCG: one core per guest);
* disk per cell = allocated bytes of the cell's qcow2 overlay / allocated bytes
  of the base image; target <= 5 %.

Environment: BENCH_MATRIX_N (cells, default 4), BENCH_MATRIX_JOBS (default: cores, at most N).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab import tinyguest  # noqa: E402
from matrix.executors import LabExecutor  # noqa: E402
from matrix.expand import expand  # noqa: E402
from matrix.load import build_spec  # noqa: E402
from matrix.progress import MatrixProgress  # noqa: E402
from matrix.runner import Runner  # noqa: E402

CONFIGS = [(b, n) for n in ("virtio-net", "e1000e") for b in ("virtio-blk", "virtio-scsi", "sata")]


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def run(spec, cells, jobs: int, out: Path) -> tuple[float, list]:
    t0 = time.monotonic()
    runner = Runner(spec, cells, LabExecutor(fix=False), out, jobs=jobs,
                    progress=MatrixProgress(spec.name, len(cells), jobs, quiet=True))
    results = runner.run()
    return time.monotonic() - t0, results.cells


def main() -> int:
    n = int(os.environ.get("BENCH_MATRIX_N", "4"))
    cores = os.cpu_count() or 1
    jobs = int(os.environ.get("BENCH_MATRIX_JOBS", str(min(cores, n))))
    base = tinyguest.disk_image("pass")
    configs = CONFIGS[:n]
    spec = build_spec({
        "name": "bench",
        "images": [{"name": "tiny", "kind": "linux", "path": str(base), "firmware": ["bios"]}],
        "bus": sorted({b for b, _ in configs}), "nic": sorted({x for _, x in configs}),
        "boot_mode": ["direct"], "timeouts": {"default": 300},
    }, "bench")
    cells = [c for c in expand(spec) if (c.bus, c.nic) in configs][:n]
    with tempfile.TemporaryDirectory(prefix="h2k-bench-matrix-") as tmp:
        t_serial, serial = run(spec, cells, 1, Path(tmp) / "serial")
        t_par, par = run(spec, cells, jobs, Path(tmp) / "parallel")
        overlays = [Path(tmp) / "parallel" / "cells" / c.id / "disk.qcow2" for c in cells]
        per_cell = max(allocated(p) for p in overlays)
    base_bytes = allocated(base)
    bad = [r.id + ": " + r.verdict for r in serial + par if r.verdict != "passed"]
    eff = t_serial / (jobs * t_par)
    print(f"cells: {len(cells)}  workers: {jobs}  cores: {cores}")
    print(f"{'run':<28}{'wall s':>10}")
    print(f"{'N cells, 1 worker':<28}{t_serial:>10.1f}")
    print(f"{'N cells, ' + str(jobs) + ' workers':<28}{t_par:>10.1f}")
    print(f"speed-up {t_serial / t_par:.2f}x, parallel efficiency {eff:.0%} (target >= 85% where cores allow)")
    print(f"disk per cell: {per_cell / 1024:.0f} KiB overlay vs {base_bytes / 1024:.0f} KiB base "
          f"= {per_cell / base_bytes:.1%} (target <= 5%)")
    for line in bad:
        print(f"cell did not pass: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
