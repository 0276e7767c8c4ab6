"""Run every benchmark (``benchmarks/bench_*.py``): ``make bench``.

Each benchmark module has ``main() -> int`` and prints its own table with
ratios against a baseline measured in the same run (never absolute targets
checked in unit tests). ``make bench BENCH=lab`` runs only bench_lab.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = set(argv) or set(filter(None, os.environ.get("BENCH", "").split(",")))
    sys.path.insert(0, str(HERE.parent))
    failures = []
    for path in sorted(HERE.glob("bench_*.py")):
        short = path.stem.removeprefix("bench_")
        if wanted and short not in wanted:
            continue
        print(f"\n=== benchmark {short} ===", flush=True)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        start = time.monotonic()
        saved_argv = sys.argv
        sys.argv = [str(path)]  # each benchmark runs with its own defaults, not run.py's arguments
        try:
            spec.loader.exec_module(module)
            rc = int(module.main() or 0)
        except Exception:  # report and go on with the other benchmarks
            traceback.print_exc()
            rc = 1
        finally:
            sys.argv = saved_argv
        print(f"=== {short}: {'ok' if rc == 0 else 'FAILED'} in {time.monotonic() - start:.1f}s ===", flush=True)
        if rc:
            failures.append(short)
    if failures:
        print(f"failed benchmarks: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
