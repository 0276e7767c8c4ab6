"""The runner's scheduling logic with a scripted CellExecutor (real qemu-img overlays, no guests).

The real executor (fix with h2k, boot with the lab) is exercised in
tests/integration/test_matrix_run*.py; here the executor is a test double so that
parallelism, caching, known issues, the watchdog, interruption and --rerun-failed
are checked in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from h2k.errors import H2KError
from matrix.expand import expand
from matrix.load import build_spec
from matrix.reports import load_results
from matrix.runner import CellOutcome, Interrupted, Prepared, Runner, interleave, worker_bound

ROOT = Path(__file__).resolve().parents[2]
XSD = ROOT / "tests" / "data" / "junit.xsd"


def qemu_img_info(path: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def make_spec(images=("a", "b"), **over):
    d = {
        "name": "unit",
        "images": [{"name": n, "kind": "linux", "recipe": "linux-bios"} for n in images],
        "firmware": ["bios"],
        "bus": ["virtio-blk", "virtio-scsi"],
        "timeouts": {"default": 60},
    }
    d.update(over)
    return build_spec(d, "unit.yaml")


class Scripted:
    """prepare(): a real 1 MiB qcow2 base; run_cell(): what ``script[cell id]`` says."""

    def __init__(self, script=None, barrier: threading.Barrier | None = None):
        self.script = script or {}
        self.prepares: list[tuple[str, str | None]] = []
        self.overlays: list[Path] = []
        self.hosts: dict[str, str | None] = {}
        self.barrier = barrier
        self.started = threading.Semaphore(0)
        self.lock = threading.Lock()

    def prepare(self, image, pack, workdir, stop):
        with self.lock:
            self.prepares.append((image.name, pack.name if pack else None))
        step = self.script.get(f"prepare:{image.name}")
        if isinstance(step, Exception):
            raise step
        base = workdir / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
        return Prepared(image, pack, base)

    def run_cell(self, ctx):
        info = qemu_img_info(ctx.overlay)
        assert Path(info["backing-filename"]) == ctx.prepared.base.resolve()
        with self.lock:
            self.overlays.append(ctx.overlay)
            self.hosts[ctx.cell.id] = ctx.connect
        self.started.release()
        if self.barrier is not None:
            self.barrier.wait(timeout=20)  # breaks unless the cells really run at the same time
        step = self.script.get(ctx.cell.id, CellOutcome("passed"))
        if step == "block":
            ctx.stop.wait(30)
            raise Interrupted("stopped")
        if isinstance(step, Exception):
            raise step
        return step


def test_interleave_starts_different_images_first():
    cells = expand(make_spec(images=("a", "b", "c")))
    order = [c.id for _, c in interleave(cells)]
    assert order[:3] == ["a.bios.virtio-blk.virtio-net", "b.bios.virtio-blk.virtio-net", "c.bios.virtio-blk.virtio-net"]
    assert sorted(order) == sorted(c.id for c in cells)
    assert [cells[i].id for i, _ in interleave(cells)] == order  # indexes point back into the matrix order


def test_worker_bound():
    assert worker_bound(None, 10, 512, cores=2, avail_mb=24000) == 2
    assert worker_bound(8, 10, 512, cores=2, avail_mb=24000) == 8  # --jobs wins over cores
    assert worker_bound(8, 3, 512, cores=2, avail_mb=24000) == 3  # never more than cells
    assert worker_bound(8, 10, 4096, cores=16, avail_mb=10000) == 1  # memory caps it
    assert worker_bound(None, 10, 2048, cores=16, avail_mb=12000) == 4


def test_parallel_cells_own_overlays_and_one_prepare_per_image(tmp_path):
    spec = make_spec()
    cells = expand(spec)
    ex = Scripted(barrier=threading.Barrier(2))
    results = Runner(spec, cells, ex, tmp_path, jobs=2).run()
    assert [r.verdict for r in results.cells] == ["passed"] * 4
    assert sorted(ex.prepares) == [("a", None), ("b", None)]  # fixed once each, not per cell
    assert len(set(ex.overlays)) == 4
    assert not results.interrupted and results.ok
    on_disk = load_results(tmp_path / "results.json")
    assert on_disk.to_dict()["counts"]["passed"] == 4 and on_disk.extra["in_progress"] is False
    subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(tmp_path / "junit.xml")], check=True,
                   capture_output=True)


def test_connect_hosts_are_dealt_round_robin(tmp_path):
    spec = make_spec(images=("a", "b", "c"))
    cells = expand(spec)
    ex = Scripted()
    hosts = ["qemu+ssh://h1/system", "qemu+ssh://h2/system"]
    results = Runner(spec, cells, ex, tmp_path, jobs=2, connect=hosts).run()
    assert [ex.hosts[c.id] for c in cells] == hosts * 3
    assert [r.host for r in results.cells] == hosts * 3


def test_outcomes_errors_and_known_issues(tmp_path):
    spec = make_spec(
        images=("a", "b", "c"),
        known_issues=[
            {"match": {"image": "a", "bus": "virtio-scsi"}, "reason": "bug 7", "stop_code": "0x7B"},
            {"match": {"image": "b", "bus": "virtio-blk"}, "reason": "other code", "stop_code": 0x50},
        ],
    )
    cells = expand(spec)
    script = {
        "a.bios.virtio-scsi.virtio-net": CellOutcome("failed", "bugcheck", 0x7B, "INACCESSIBLE_BOOT_DEVICE"),
        "b.bios.virtio-blk.virtio-net": CellOutcome("failed", "bugcheck", 0x7B, "INACCESSIBLE_BOOT_DEVICE"),
        "b.bios.virtio-scsi.virtio-net": RuntimeError("lab exploded"),
        "prepare:c": H2KError("c: hibernated, refusing"),
    }
    results = Runner(spec, cells, Scripted(script), tmp_path, jobs=2).run()
    by = results.by_id()
    soft = by["a.bios.virtio-scsi.virtio-net"]
    assert soft.verdict == "softfailed" and soft.note.startswith("known issue: bug 7 (was failed: bugcheck)")
    assert by["b.bios.virtio-blk.virtio-net"].verdict == "failed"  # the known issue names another stop code
    broken = by["b.bios.virtio-scsi.virtio-net"]
    assert broken.verdict == "incomplete" and "RuntimeError: lab exploded" in broken.reason
    assert "lab exploded" in Path(broken.artifacts["traceback"]).read_text()
    for cid in ("c.bios.virtio-blk.virtio-net", "c.bios.virtio-scsi.virtio-net"):
        assert by[cid].verdict == "failed" and by[cid].reason == "c: hibernated, refusing"
    assert not results.ok


def test_watchdog_turns_an_overrun_into_timeout(tmp_path):
    spec = make_spec(images=("a",), bus=["virtio-blk"], timeouts={"default": 1})
    cells = expand(spec)
    ex = Scripted({cells[0].id: "block"})
    results = Runner(spec, cells, ex, tmp_path, jobs=1, watchdog_grace=0.5).run()
    r = results.cells[0]
    assert r.verdict == "timeout" and "stopped by the runner" in r.reason
    assert 1.4 < r.seconds < 20


def test_stop_leaves_a_valid_partial_report(tmp_path):
    spec = make_spec(images=("a", "b", "c"))
    cells = expand(spec)
    ex = Scripted({c.id: "block" for c in cells})
    runner = Runner(spec, cells, ex, tmp_path, jobs=2)
    t = threading.Thread(target=lambda: setattr(runner, "final", runner.run()))
    t.start()
    assert ex.started.acquire(timeout=30) and ex.started.acquire(timeout=30)  # two cells running
    mid = load_results(tmp_path / "results.json")  # readable while running
    assert mid.extra["in_progress"] is True
    runner.stop()
    t.join(30)
    assert not t.is_alive()
    verdicts = sorted(r.verdict for r in runner.final.cells)
    assert verdicts == ["incomplete", "incomplete", "skipped", "skipped", "skipped", "skipped"]
    assert runner.final.interrupted
    disk = load_results(tmp_path / "results.json")
    assert disk.to_dict()["counts"] == runner.final.to_dict()["counts"] and disk.extra["in_progress"] is False


class HungFix(Scripted):
    """The fix of image 'a' hangs: until told to stop (``obeys``), or for good (it ignores its stop event)."""

    def __init__(self, obeys: bool):
        super().__init__()
        self.obeys = obeys
        self.stopped = threading.Event()
        self.never = threading.Event()

    def prepare(self, image, pack, workdir, stop):
        if image.name != "a":
            return super().prepare(image, pack, workdir, stop)
        if self.obeys:
            stop.wait(60)
            self.stopped.set()
            raise Interrupted("prepare stopped")
        self.never.wait(60)  # a fix stuck in C code: never looks at ``stop``
        raise AssertionError("unreachable in the test's time")


@pytest.mark.parametrize("obeys", [True, False], ids=["fix-stops", "fix-ignores-its-stop"])
def test_a_hung_shared_fix_times_its_cells_out_and_the_run_goes_on(tmp_path, obeys):
    spec = make_spec(images=("a", "b"))
    cells = expand(spec)
    ex = HungFix(obeys)
    t0 = time.monotonic()
    results = Runner(spec, cells, ex, tmp_path, jobs=2, fix_timeout=1.0, watchdog_grace=1.0).run()
    assert time.monotonic() - t0 < 30  # not the 60 s the fix would hang
    by = {r.cell.id: r for r in results.cells}
    for cid, r in by.items():
        if cid.startswith("a."):
            assert r.verdict == "timeout" and "shared fix of a did not finish within 1s" in r.reason, r
            assert ("did not stop" in r.reason) == (not obeys)
        else:
            assert r.verdict == "passed", r
    assert ex.stopped.is_set() == obeys
    assert load_results(tmp_path / "results.json").by_id()["a.bios.virtio-blk.virtio-net"].verdict == "timeout"
    ex.never.set()


# --- through the command line, with the executor in its own module ---------------------

EXECUTOR_MODULE = textwrap.dedent(
    '''
    """Test executors for h2k matrix run: a real child process stands in for QEMU."""
    import json, os, signal, subprocess, threading
    from pathlib import Path
    from matrix.runner import CellOutcome, Interrupted, Prepared

    class Base:
        def prepare(self, image, pack, workdir, stop):
            base = workdir / "base.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
            return Prepared(image, pack, base)

    class Blocking(Base):
        """Each cell runs a 'sleep' in its own session (as the lab runs QEMU) until stopped."""
        def run_cell(self, ctx):
            child = subprocess.Popen(["sleep", "600"], start_new_session=True)
            Path(os.environ["PIDS_DIR"], ctx.cell.id).write_text(str(child.pid))
            ctx.stop.wait()
            child.terminate()
            child.wait()
            raise Interrupted("stopped while booting")

    class FromFile(Base):
        """Verdicts from $VERDICTS (JSON: cell id -> verdict); cells it does not name pass."""
        def run_cell(self, ctx):
            verdicts = json.loads(Path(os.environ["VERDICTS"]).read_text())
            Path(os.environ["RAN_LOG"]).open("a").write(ctx.cell.id + "\\n")
            return CellOutcome(verdicts.get(ctx.cell.id, "passed"), reason="scripted")
    '''
)


@pytest.fixture()
def cli_env(tmp_path):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "h2k_test_executors.py").write_text(EXECUTOR_MODULE)
    (tmp_path / "pids").mkdir()
    m = tmp_path / "m.yaml"
    m.write_text(textwrap.dedent(
        """
        name: cli
        images:
          - {name: a, kind: linux, recipe: linux-bios}
          - {name: b, kind: linux, recipe: linux-bios}
        firmware: [bios]
        bus: [virtio-blk, virtio-scsi, sata]
        timeouts: {default: 600}
        """))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'mod'}{os.pathsep}{ROOT}", PIDS_DIR=str(tmp_path / "pids"),
               VERDICTS=str(tmp_path / "verdicts.json"), RAN_LOG=str(tmp_path / "ran.log"), H2K_QUIET="0")
    return tmp_path, m, env


def h2k(*args):
    return [sys.executable, "-m", "h2k", *args]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_running_cells_and_writes_valid_reports(cli_env, sig):
    tmp, m, env = cli_env
    out = tmp / "out"
    proc = subprocess.Popen(h2k("matrix", "run", str(m), "-o", str(out), "-j", "2",
                                "--executor", "h2k_test_executors:Blocking"),
                            env=env, stderr=subprocess.PIPE, text=True)
    starts = 0
    lines = []
    for line in proc.stderr:  # wait for the event "two cells started", not a fixed time
        lines.append(line)
        if "| start " in line:
            starts += 1
            if starts == 2:
                break
    assert starts == 2, "".join(lines)
    proc.send_signal(sig)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, "".join(lines) + rest
    assert f"{sig.name}: stopping" in rest
    results = load_results(out / "results.json")
    verdicts = sorted(r.verdict for r in results.cells)
    assert verdicts == ["incomplete", "incomplete", "skipped", "skipped", "skipped", "skipped"]
    assert results.interrupted
    subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(out / "junit.xml")], check=True,
                   capture_output=True)
    assert "Run interrupted" in (out / "summary.md").read_text()
    for pid_file in (tmp / "pids").iterdir():  # every stand-in QEMU is gone
        pid = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_rerun_failed_runs_only_failures_and_merges(cli_env):
    tmp, m, env = cli_env
    (tmp / "verdicts.json").write_text(json.dumps({"a.bios.sata.virtio-net": "failed",
                                                   "b.bios.virtio-blk.virtio-net": "timeout"}))
    out1 = tmp / "run1"
    p = subprocess.run(h2k("matrix", "run", str(m), "-o", str(out1), "--executor", "h2k_test_executors:FromFile"),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert len((tmp / "ran.log").read_text().split()) == 6
    (tmp / "ran.log").unlink()
    (tmp / "verdicts.json").write_text(json.dumps({"b.bios.virtio-blk.virtio-net": "failed"}))
    out2 = tmp / "run2"
    p = subprocess.run(h2k("matrix", "run", str(m), "-o", str(out2), "--rerun-failed", str(out1 / "results.json"),
                           "--executor", "h2k_test_executors:FromFile"), env=env, capture_output=True, text=True)
    assert p.returncode == 1, p.stderr
    assert sorted((tmp / "ran.log").read_text().split()) == ["a.bios.sata.virtio-net", "b.bios.virtio-blk.virtio-net"]
    merged = load_results(out2 / "results.json")
    by = merged.by_id()
    assert len(merged.cells) == 6
    assert by["a.bios.sata.virtio-net"].verdict == "passed"
    assert by["b.bios.virtio-blk.virtio-net"].verdict == "failed"
    assert by["a.bios.virtio-blk.virtio-net"].verdict == "passed"
    # a shard of a rerun: --shard and --rerun-failed compose
    (tmp / "ran.log").unlink()
    (tmp / "verdicts.json").write_text("{}")
    p = subprocess.run(h2k("matrix", "run", str(m), "-o", str(tmp / "run3"), "--rerun-failed",
                           str(out2 / "results.json"), "--executor", "h2k_test_executors:FromFile"),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp / "ran.log").read_text().split() == ["b.bios.virtio-blk.virtio-net"]
    p = subprocess.run(h2k("matrix", "run", str(m), "-o", str(tmp / "run4"), "--rerun-failed",
                           str(tmp / "run3" / "results.json"), "--executor", "h2k_test_executors:FromFile"),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 3 and "nothing failed in the previous run" in p.stderr


def test_list_shards_partition_the_shipped_nightly():
    nightly = ROOT / "matrix" / "nightly.yaml"
    run = lambda *a: subprocess.run(h2k("matrix", "list", str(nightly), *a), capture_output=True, text=True,
                                    check=True, cwd=ROOT).stdout.split("\n")
    all_ids = {line.split("\t")[0] for line in run() if line}
    parts = [{line.split("\t")[0] for line in run("--shard", f"{i}/3") if line} for i in (1, 2, 3)]
    assert set().union(*parts) == all_ids and sum(map(len, parts)) == len(all_ids)


def test_a_missing_image_is_bad_input_before_anything_runs(cli_env):
    tmp, m, env = cli_env
    out = tmp / "out"
    p = subprocess.run(h2k("matrix", "run", str(m), "-o", str(out), "--image-path", f"a={tmp / 'nope.qcow2'}",
                           "--executor", "h2k_test_executors:FromFile"), env=env, capture_output=True, text=True)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("h2k: error: ")]
    assert p.returncode == 3 and len(errors) == 1 and "nope.qcow2 does not exist" in errors[0], p.stderr
    assert not out.exists() and not (tmp / "ran.log").exists()  # no cell ran, no report folder


def test_a_second_run_into_the_same_folder_is_refused(cli_env):
    tmp, m, env = cli_env
    (tmp / "verdicts.json").write_text("{}")
    out = tmp / "out"
    first = subprocess.Popen(h2k("matrix", "run", str(m), "-o", str(out), "-j", "2",
                                 "--executor", "h2k_test_executors:Blocking"),
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stderr:  # the first run holds the folder once a cell started
            if "| start " in line:
                break
        second = subprocess.run(h2k("matrix", "run", str(m), "-o", str(out), "--executor",
                                    "h2k_test_executors:FromFile"), env=env, capture_output=True, text=True)
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("h2k: error: ")]
        assert second.returncode == 3 and len(errors) == 1, second.stderr
        assert f"another h2k matrix run (pid {first.pid})" in errors[0]
        assert not (tmp / "ran.log").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.stderr.read()
        assert first.wait(60) == 130
    # once the first run is over, the folder is free again
    p = subprocess.run(h2k("matrix", "run", str(m), "-o", str(out), "--executor", "h2k_test_executors:FromFile"),
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
