"""Time the phony-disk test bed: cold build and cached lookup of each variant.

Cold builds go to a fresh temporary H2K_CACHE_DIR (deleted afterwards), so
nothing already cached is reused or disturbed. Prints a table; exit 0.

    .venv/bin/python benchmarks/bench_testbed.py [--only NAME ...] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="variants to time (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache directory and print it")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="h2k-bench-testbed-"))
    old = os.environ.get("H2K_CACHE_DIR")
    os.environ["H2K_CACHE_DIR"] = str(tmp)
    os.environ.setdefault("H2K_QUIET", "1")
    try:
        from lab.testbed import windisk

        names = args.only or list(windisk.VARIANTS)
        unknown = [n for n in names if n not in windisk.VARIANTS]
        if unknown:
            print(f"bench_testbed: unknown variant(s): {', '.join(unknown)}", file=sys.stderr)
            return 3
        rows = []
        for name in names:
            t0 = time.monotonic()
            path = windisk.build(name)
            cold = time.monotonic() - t0
            t0 = time.monotonic()
            again = windisk.build(name)
            cached = time.monotonic() - t0
            assert again == path
            rows.append((name, cold, cached * 1000, path.stat().st_size / 2**20))
            print(f"{name}: cold {cold:.1f} s", file=sys.stderr, flush=True)
        print(f"{'variant':<20} {'cold build (s)':>15} {'cached (ms)':>12} {'qcow2 (MiB)':>12}")
        for name, cold, cached_ms, mib in rows:
            print(f"{name:<20} {cold:>15.1f} {cached_ms:>12.2f} {mib:>12.1f}")
        total = sum(r[1] for r in rows)
        print(f"{'total':<20} {total:>15.1f}")
        print(f"load average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        if old is None:
            os.environ.pop("H2K_CACHE_DIR", None)
        else:
            os.environ["H2K_CACHE_DIR"] = old
        if args.keep:
            print(f"cache kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
