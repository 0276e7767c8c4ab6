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
