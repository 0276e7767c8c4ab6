"""Matrix files: schema errors name the file and the field; shipped matrices load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from matrix.expand import expand
from matrix.load import MatrixError, build_spec, expand_vars, load_matrix

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "matrix").glob("*.yaml"))


def base() -> dict:
    return {
        "name": "t",
        "images": [
            {"name": "win2019", "kind": "windows", "path": "/img/win2019.qcow2"},
            {"name": "deb", "kind": "linux", "recipe": "linux-bios"},
        ],
        "packs": [{"name": "vw", "path": "/p.iso"}],
        "firmware": ["bios", "uefi"],
        "bus": ["virtio-blk"],
    }


def err(data, src="m.yaml") -> str:
    with pytest.raises(MatrixError) as ei:
        build_spec(data, src)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{src}: ")
    return msg


def test_valid_base_loads():
    spec = build_spec(base(), "m.yaml")
    assert [i.name for i in spec.images] == ["win2019", "deb"]
    assert spec.boot_mode == ["two-phase"] and spec.nic == ["virtio-net"] and spec.default_timeout == 900


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (lambda d: d["images"][1].update(kind="linx"), "images[1].kind", "'linx' is not one of"),
        (lambda d: d["images"][0].update(colour="red"), "images[0]", "unknown field"),
        (lambda d: d.update(bus=["nvme"]), "bus[0]", "'nvme' is not one of"),
        (lambda d: d.update(firmware=[]), "firmware", "should be non-empty"),
        (lambda d: d.update(firmware=["bios", "bios"]), "firmware", "non-unique"),
        (lambda d: d.pop("images"), "(top level)", "'images' is a required property"),
        (lambda d: d.update(timeouts={"default": 0}), "timeouts.default", "less than the minimum"),
        (lambda d: d.update(exclude=[{"colour": "x"}]), "exclude[0]", "unknown field"),
        (lambda d: d.update(known_issues=[{"match": {"bus": "ide"}}]), "known_issues[0]", "'reason' is a required"),
        (lambda d: d.update(name="has space"), "name", "does not match"),
    ],
)
def test_schema_errors_name_the_field(mutate, field, words):
    data = base()
    mutate(data)
    msg = err(data)
    assert f"m.yaml: {field}: " in msg
    assert words in msg


def test_semantic_errors():
    d = base()
    d["images"].append({"name": "deb", "kind": "linux", "recipe": "x"})
    assert "images[2].name: duplicate image name 'deb'" in err(d)
    d = base()
    d["images"][0].pop("path")
    assert "images[0]: needs a path or a test-bed recipe" in err(d)
    d = base()
    d["images"][0]["recipe"] = "r"
    assert "either path or recipe" in err(d)
    d = base()
    d.pop("packs")
    assert "packs: Windows images need at least one driver pack" in err(d)
    d = base()
    d["include"] = [{"image": "win2O19"}]  # a typo must not silently match nothing
    assert "include[0].image: 'win2O19' is not one of" in err(d)
    d = base()
    d["known_issues"] = [{"match": {"bus": "scsi"}, "reason": "r"}]
    assert "known_issues[0].match.bus: 'scsi'" in err(d)
    d = base()
    d["known_issues"] = [{"match": {"bus": "ide"}, "reason": "r", "stop_code": "7B-ish"}]
    assert "known_issues[0].stop_code" in err(d)


def test_file_errors(tmp_path):
    with pytest.raises(MatrixError, match=r"missing.yaml: cannot read matrix file"):
        load_matrix(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nimages: [\n")
    with pytest.raises(MatrixError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_matrix(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(MatrixError, match=r"list.yaml: \(top level\): a matrix file must be a mapping"):
        load_matrix(lst)


def test_env_vars_and_overrides(tmp_path):
    assert expand_vars("${A}/x", {"A": "/a"}) == "/a/x"
    assert expand_vars("${A:-/d}/x", {}) == "/d/x"
    assert expand_vars("${A}", {}) == ""
    d = base()
    d["images"][0]["path"] = "${WIN2019_IMG}"
    spec = build_spec(d, "m.yaml", env={})
    assert spec.image("win2019").path is None  # listed without its image; only run needs it
    spec = build_spec(d, "m.yaml", env={"WIN2019_IMG": "/e.qcow2"})
    assert spec.image("win2019").path == "/e.qcow2"
    spec = build_spec(d, "m.yaml", env={"WIN2019_IMG": "/e.qcow2"}, image_paths={"win2019": "/cli.qcow2"},
                      pack_paths={"vw": "/new.iso"})
    assert spec.image("win2019").path == "/cli.qcow2" and spec.pack("vw").path == "/new.iso"
    with pytest.raises(MatrixError, match=r"--image-path: no image named 'nope'"):
        build_spec(base(), "m.yaml", image_paths={"nope": "/x"})


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_matrices_load_and_expand(path):
    spec = load_matrix(path, env={})
    cells = expand(spec)
    assert cells, path
    assert len({c.id for c in cells}) == len(cells)
    raw = yaml.safe_load(path.read_text())
    assert raw["name"] == spec.name


def test_testbed_windows_cells_are_fix_verify():
    cells = expand(load_matrix(ROOT / "matrix" / "testbed-windows.yaml", env={}))
    assert {c.mode for c in cells} == {"fix+verify"}
    cells = expand(load_matrix(ROOT / "matrix" / "testbed-linux.yaml", env={}))
    assert {c.mode for c in cells} == {"boot"} and {c.pack for c in cells} == {None}


def test_expect_per_image_and_per_rule_reaches_each_cell():
    from matrix.executors import cell_expect

    d = base()
    d["images"][1]["expect"] = {"success": ["agent+login", ["systemd-target"]]}
    d["expect"] = [
        {"match": {"image": "deb", "firmware": "uefi"}, "patterns": ["Welcome to Debian"], "success": ["pattern"]},
        {"match": {"kind": "windows"}, "success": ["ems+agent"]},
    ]
    cells = {c.id: c for c in expand(build_spec(d, "m.yaml"))}
    bios, uefi = cells["deb.bios.virtio-blk.virtio-net"], cells["deb.uefi.virtio-blk.virtio-net"]
    assert bios.success == (("agent", "login"), ("systemd-target",)) and bios.patterns == ()
    assert uefi.success == (("pattern",),) and uefi.patterns == ("Welcome to Debian",)
    assert cell_expect(bios).alternatives() == [["agent", "login"], ["systemd-target"]]
    assert cell_expect(uefi).success_patterns == ["Welcome to Debian"]
    win = cell_expect(cells["win2019.bios.virtio-blk.virtio-net"])
    assert win.alternatives() == [["ems", "agent"]] and win.collect_devices
    # No expect: the kind's default; a Windows cell runs h2k's first-boot installer, so the agent.
    d.pop("expect")
    cells = {c.id: c for c in expand(build_spec(d, "m.yaml"))}
    assert cell_expect(cells["win2019.uefi.virtio-blk.virtio-net"]).alternatives() == [["agent"]]
    d["images"][1].pop("expect")
    deb = cell_expect(next(c for c in expand(build_spec(d, "m.yaml")) if c.image == "deb"))
    assert deb.alternatives() == [["login"], ["systemd-target"], ["agent"]]


@pytest.mark.parametrize("expect_rule, field, words", [
    ({"match": {"image": "deb"}, "success": ["agent+logn"]}, "expect[0].success", "unknown evidence 'logn'"),
    ({"match": {"image": "deb"}, "patterns": ["(unclosed"]}, "expect[0].patterns[0]", "not a valid regex"),
    ({"match": {"image": "deb"}}, "expect[0]", "does not have enough properties"),
    ({"match": {"image": "debx"}, "success": ["agent"]}, "expect[0].match.image", "'debx' is not one of"),
])
def test_bad_expect_is_one_line(expect_rule, field, words):
    d = base()
    d["expect"] = [expect_rule]
    msg = err(d)
    assert f"m.yaml: {field}" in msg and words in msg, msg


def test_a_pattern_no_alternative_uses_is_named_with_its_cell():
    d = base()
    d["images"][1]["expect"] = {"patterns": ["ready"]}
    d["expect"] = [{"match": {"image": "deb", "firmware": "uefi"}, "success": ["agent"]}]
    spec = build_spec(d, "m.yaml")
    with pytest.raises(MatrixError) as ei:
        expand(spec)
    assert str(ei.value).startswith("m.yaml: cell deb.uefi.virtio-blk.virtio-net: success patterns are given")


@pytest.mark.parametrize("name", ["nightly.yaml", "driver-gate.yaml"])
def test_shipped_windows_matrices_pass_on_the_agent_and_collect_devices(name):
    from matrix.executors import cell_expect

    cells = expand(load_matrix(ROOT / "matrix" / name, env={}))
    assert cells and all(c.kind == "windows" for c in cells)
    for c in cells:
        exp = cell_expect(c)
        assert exp.alternatives() == [["agent"]] and exp.collect_devices, c.id
