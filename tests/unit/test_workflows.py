"""The GitHub workflows are valid against a workflow schema, and what they run exists and fits together."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from matrix.expand import expand
from matrix.load import load_matrix
from matrix.shard import Shard, shard_of

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests" / "data" / "github-workflow.schema.json").read_text())
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as the boolean True; GitHub reads it as "on".
    if True in data:
        data["on"] = data.pop(True)
    return data


def errors(data: dict) -> list[str]:
    v = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in v.iter_errors(data)]


def test_the_workflows_we_expect_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "nightly.yml", "driver-gate.yml"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_matches_schema(path):
    data = load(path)
    assert errors(data) == []
    jobs = data["jobs"]
    for jid, job in jobs.items():
        needs = job.get("needs", [])
        for need in [needs] if isinstance(needs, str) else needs:
            assert need in jobs, f"{path.name}: job {jid} needs unknown job {need}"
    text = path.read_text()
    assert text.count("${{") == text.count("}}"), "unbalanced ${{ }} expression"


def test_schema_rejects_broken_workflows():
    good = {"on": "push", "jobs": {"t": {"runs-on": "ubuntu-24.04", "steps": [{"run": "make test"}]}}}
    assert errors(good) == []
    bad_cases = [
        {"jobs": good["jobs"]},  # no trigger
        {"on": "pushh", "jobs": good["jobs"]},  # unknown event
        {"on": "push", "jobs": {"t": {"steps": [{"run": "x"}]}}},  # no runs-on
        {"on": "push", "jobs": {"t": {"runs-on": "x", "steps": [{"run": "a", "uses": "actions/checkout@v4"}]}}},
        {"on": "push", "jobs": {"t": {"runs-on": "x", "steps": [{"name": "nothing to do"}]}}},
        {"on": "push", "jobs": {"t": {"runs-on": "x", "steps": [{"uses": "actions/checkout"}]}}},  # unpinned
        {"on": "push", "jobs": {"t": {"runs-on": "x", "step": [{"run": "a"}]}}},  # typo
        {"on": {"schedule": [{"cron": "daily"}]}, "jobs": good["jobs"]},
    ]
    for bad in bad_cases:
        assert errors(bad), bad


def _h2k_commands(data: dict) -> list[list[str]]:
    cmds = []
    for job in data["jobs"].values():
        for step in job.get("steps", []):
            run = step.get("run", "")
            joined = re.sub(r"\\\n\s*", " ", run)
            for line in joined.splitlines():
                if "h2k matrix" in line:
                    cmds.append(line.strip())
    return cmds


def test_nightly_shards_cover_the_matrix():
    data = load(ROOT / ".github" / "workflows" / "nightly.yml")
    shard_job = data["jobs"]["shard"]
    shards = shard_job["strategy"]["matrix"]["shard"]
    n = int(data["env"]["SHARDS"])
    assert shards == list(range(1, n + 1))
    assert shard_job["strategy"]["fail-fast"] is False  # one failing shard must not cancel the others
    assert any("--shard \"${{ matrix.shard }}/$SHARDS\"" in c for c in _h2k_commands(data))
    assert data["jobs"]["merge"]["needs"] == "shard" and data["jobs"]["merge"]["if"] == "always()"
    cells = expand(load_matrix(ROOT / "matrix" / "nightly.yaml", env={}))
    parts = [shard_of(cells, Shard(i, n)) for i in shards]
    assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cells)
    # every env var the matrix file reads is provided to the shard job
    wanted = set(re.findall(r"\$\{(\w+)", (ROOT / "matrix" / "nightly.yaml").read_text()))
    assert wanted <= set(shard_job["env"])
    commands = " ".join(_h2k_commands(data))
    assert "GITHUB_STEP_SUMMARY" in commands and "h2k matrix report shards/*/results.json" in commands


def test_driver_gate_runs_both_packs_then_gates():
    data = load(ROOT / ".github" / "workflows" / "driver-gate.yml")
    assert "matrix/driver-gate.yaml" in data["on"]["pull_request"]["paths"]
    cmds = _h2k_commands(data)
    runs = [c for c in cmds if "matrix run" in c]
    assert len(runs) == 2 and all("--pack-path \"pack=" in c for c in runs)
    gate = next(c for c in cmds if "matrix gate" in c)
    assert "--baseline out/baseline/results.json" in gate and "--candidate out/candidate/results.json" in gate
    wanted = set(re.findall(r"\$\{(\w+)", (ROOT / "matrix" / "driver-gate.yaml").read_text())) - {"H2K_PACK"}
    assert wanted <= set(data["jobs"]["gate"]["env"])


def test_driver_gate_pack_file_has_what_the_workflow_reads():
    data = load(ROOT / ".github" / "workflows" / "driver-gate.yml")
    script = "\n".join(step.get("run", "") for step in data["jobs"]["gate"]["steps"])
    assert "driver-packs/current.json" in script and "driver-packs/**" in data["on"]["pull_request"]["paths"]
    pack = json.loads((ROOT / "driver-packs" / "current.json").read_text())
    read = set(re.findall(r'd(?:\.get\(|\[)"(\w+)"', script))
    assert read == {"path", "version"} and read <= set(pack)
    assert pack["path"] and isinstance(pack["version"], str)


def _matrix_argv(cmd: str) -> list[str]:
    """An 'h2k matrix ...' workflow line as argv from 'matrix' on (expressions and shell arrays stubbed)."""
    words = shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "X", cmd).replace('"${only[@]}"', "")
                        .replace('"${version[@]}"', "").replace("|| true", ""))
    return words[words.index("matrix"):]


def test_matrix_commands_in_workflows_parse():
    """Every 'h2k matrix ...' line in a workflow is accepted by h2k's own argument parser."""
    from h2k.cli import build_parser

    parser = build_parser()
    for path in WORKFLOWS:
        for cmd in _h2k_commands(load(path)):
            words = _matrix_argv(cmd)
            args = parser.parse_args(words)
            if hasattr(args, "matrix") and isinstance(args.matrix, str) and not args.matrix.startswith("$"):
                assert (ROOT / args.matrix).exists(), args.matrix


def _outputs(cmd: str) -> list[str]:
    """The HTML reports an 'h2k matrix ...' line writes (run/report: <out>/report.html; gate: --html)."""
    words = _matrix_argv(cmd)
    from h2k.cli import build_parser

    args = build_parser().parse_args(words)
    if words[1] == "gate":
        assert args.html, f"{cmd}: the gate must write its HTML where the upload finds it"
        return [args.html]
    return [f"{args.out}/report.html"]


@pytest.mark.parametrize("name", ["nightly.yml", "driver-gate.yml"])
def test_html_reports_are_uploaded_and_linked_from_the_step_summary(name):
    data = load(ROOT / ".github" / "workflows" / name)
    checked = 0
    for jid, job in data["jobs"].items():
        steps = job.get("steps", [])
        html = [out for s in steps for c in _h2k_commands({"jobs": {"j": {"steps": [s]}}}) for out in _outputs(c)]
        if not html:
            continue
        uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
        assert len(uploads) == 1 and uploads[0].get("if") == "always()", jid
        upload = uploads[0]
        paths = re.sub(r"\$\{\{[^}]*\}\}", "X", upload["with"]["path"]).split()
        for out in html:  # uploaded as a file (or a glob), or with the folder holding it
            assert any(fnmatch.fnmatch(out, p) or (p.endswith("/") and out.startswith(p)) for p in paths), (jid, out)
        # the run's screens and logs it links travel with it
        assert any("png" in p or p.endswith("/") for p in paths) and any("jsonl" in p or p.endswith("/")
                                                                          for p in paths), jid
        # and the step summary links the artifact (upload-artifact's artifact-url output)
        url = f"steps.{upload['id']}.outputs.artifact-url"
        link = [s for s in steps if url in s.get("run", "") and "GITHUB_STEP_SUMMARY" in s.get("run", "")]
        assert link and link[0].get("if") == "always()", jid
        assert steps.index(link[0]) > steps.index(upload)
        checked += 1
    assert checked
