"""The lab's own cost per boot, and how fast a GUEST_PANICKED becomes a verdict.

Baseline measured in the same run: the same tiny guest (mode=reboot) under bare
QEMU (``-no-reboot -serial stdio``; QEMU exits when the guest resets), against
the lab booting it (overlay, sockets, QMP, watchers, scoring, screendump,
teardown; verdict "reboot loop"). The difference is the lab's overhead.
Then a panicking guest: the delay from QEMU emitting GUEST_PANICKED (its QMP
timestamp) to the lab acting on the verdict (its first evidence command), on
the pure QMP path (no console patterns) and on the default path (console
panic line first, corroborated by QMP).

Targets (issue 4): overhead <= 2 s per boot, GUEST_PANICKED -> verdict <= 1 s.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from h2k import accel  # noqa: E402
from lab import backend_qemu, tinyguest  # noqa: E402
from lab.boot import boot  # noqa: E402
from lab.verdict import Expect  # noqa: E402


def bare_qemu_reboot_seconds() -> float:
    kernel, _ = tinyguest.host_kernel()
    cmd = ["qemu-system-x86_64", *accel.decide(announce=False).qemu_args(), "-machine", "q35", "-m", "512",
           "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
           "-kernel", str(kernel), "-initrd", str(tinyguest.initramfs()),
           "-append", tinyguest.append_for("reboot")]
    t0 = time.monotonic()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=False)
    return time.monotonic() - t0


def overlay_ms(n: int = 20) -> float:
    img = tinyguest.disk_image("pass")
    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(n):
            t0 = time.monotonic()
            backend_qemu.create_overlay(img, Path(d) / f"o{i}.qcow2")
            times.append(time.monotonic() - t0)
    return statistics.median(times) * 1000


def panic_delay(out: Path, expect: Expect) -> tuple[float, float, dict]:
    r = boot(None, tinyguest.kernel_profile("panic"), timeout=600, outdir=out, expect=expect)
    assert r.verdict == "failed" and r.signal == "qmp-panic", r.reason
    recs = [json.loads(x) for x in (out / "qmp.jsonl").read_text().splitlines()]
    ev = next(x for x in recs if x["msg"].get("event") == "GUEST_PANICKED")
    emitted = ev["msg"]["timestamp"]["seconds"] + ev["msg"]["timestamp"]["microseconds"] / 1e6
    acted = next(x["t"] for x in recs if x["dir"] == "out" and x["msg"].get("execute") == "screendump")
    return acted - emitted, r.timings.get("signal_to_verdict", 0.0), r.timings


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="h2k-bench-lab-") as tmp:
        tmpd = Path(tmp)
        tinyguest.initramfs()
        ov = overlay_ms()
        bare = bare_qemu_reboot_seconds()
        t0 = time.monotonic()
        r = boot(None, tinyguest.kernel_profile("reboot"), timeout=600, outdir=tmpd / "reboot")
        lab = time.monotonic() - t0
        assert r.verdict == "failed" and r.signal == "qmp-reset", r.reason
        t = r.timings
        internal = ov / 1000 + t.get("lab_start", 0) + t.get("screendump", 0) + t.get("teardown", 0)
        e2e_qmp, s2v_qmp, _ = panic_delay(tmpd / "panic-qmp", Expect(failure_patterns=[]))
        e2e_def, s2v_def, _ = panic_delay(tmpd / "panic-default", Expect())
    rows += [
        ("qcow2 overlay create (median of 20)", f"{ov:.1f} ms", ""),
        ("QEMU start -> QMP ready", f"{t.get('start_to_qmp', 0) * 1000:.0f} ms", ""),
        ("lab start (overlay..watchers..cont)", f"{t.get('lab_start', 0) * 1000:.0f} ms", ""),
        ("screendump at verdict", f"{t.get('screendump', 0) * 1000:.0f} ms", ""),
        ("teardown (quit, reap, remove temp dir)", f"{t.get('teardown', 0) * 1000:.0f} ms", ""),
        ("lab's own work per boot (sum of above)", f"{internal:.2f} s", "target <= 2 s"),
        ("bare QEMU, reboot guest (baseline)", f"{bare:.2f} s", "1.00x"),
        ("lab boot, same guest (verdict: reboot loop)", f"{lab:.2f} s", f"{lab / bare:.2f}x"),
        ("lab - bare (wall-clock overhead)", f"{lab - bare:+.2f} s", "target <= 2 s"),
        ("GUEST_PANICKED emitted -> verdict acted on (QMP only)", f"{e2e_qmp * 1000:.0f} ms", "target <= 1 s"),
        ("  of which signal received -> verdict", f"{s2v_qmp * 1000:.1f} ms", ""),
        ("GUEST_PANICKED emitted -> verdict (default, console first)", f"{e2e_def * 1000:.0f} ms", "target <= 1 s"),
        ("  console panic line -> corroborated verdict", f"{s2v_def * 1000:.1f} ms", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(w)}  {'value':>10}  note")
    for name, val, note in rows:
        print(f"{name.ljust(w)}  {val:>10}  {note}")
    print(f"(accelerator: {accel.decide(announce=False).describe()})")
    ok = internal <= 2.0 and e2e_qmp <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
