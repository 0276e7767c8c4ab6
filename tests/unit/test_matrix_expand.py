"""Cell expansion: product, per-image lists, exclude/include, stable IDs, timeouts, known issues."""

from __future__ import annotations

from matrix.expand import expand, select
from matrix.load import build_spec


def spec(**over):
    d = {
        "name": "t",
        "images": [
            {"name": "win2019", "kind": "windows", "path": "/w.qcow2", "firmware": ["uefi"]},
            {"name": "win2008r2", "kind": "windows", "path": "/o.qcow2", "firmware": ["bios"]},
            {"name": "deb", "kind": "linux", "recipe": "linux-bios"},
        ],
        "packs": [{"name": "vw", "path": "/p.iso"}],
        "firmware": ["bios", "uefi"],
        "bus": ["virtio-blk", "virtio-scsi"],
        "nic": ["virtio-net"],
    }
    d.update(over)
    return build_spec(d, "m.yaml")


def ids(s):
    return [c.id for c in expand(s)]


def test_product_with_image_restrictions_in_stable_order():
    assert ids(spec()) == [
        "win2019.uefi.virtio-blk.virtio-net",
        "win2019.uefi.virtio-scsi.virtio-net",
        "win2008r2.bios.virtio-blk.virtio-net",
        "win2008r2.bios.virtio-scsi.virtio-net",
        "deb.bios.virtio-blk.virtio-net",
        "deb.bios.virtio-scsi.virtio-net",
        "deb.uefi.virtio-blk.virtio-net",
        "deb.uefi.virtio-scsi.virtio-net",
    ]
    assert ids(spec()) == ids(spec())  # deterministic


def test_pack_in_id_only_with_several_packs_and_never_for_linux():
    s = spec(packs=[{"name": "vw", "path": "/a"}, {"name": "vw-next", "path": "/b"}])
    got = ids(s)
    assert "win2019.uefi.virtio-blk.virtio-net.vw" in got
    assert "win2019.uefi.virtio-blk.virtio-net.vw-next" in got
    assert "deb.bios.virtio-blk.virtio-net" in got  # Linux takes no pack
    assert len(got) == 4 * 2 + 4
    cell = next(c for c in expand(s) if c.id.endswith(".vw-next"))
    assert cell.pack == "vw-next" and cell.config == "uefi.virtio-blk.virtio-net.vw-next"


def test_boot_mode_in_id_when_several():
    got = ids(spec(boot_mode=["two-phase", "direct"]))
    assert "win2019.uefi.virtio-blk.virtio-net.two-phase" in got
    assert "win2019.uefi.virtio-blk.virtio-net.direct" in got


def test_exclude_partial_lists_and_globs():
    got = ids(spec(exclude=[{"image": "deb", "firmware": "uefi"}]))
    assert not any(i.startswith("deb.uefi") for i in got) and "deb.bios.virtio-blk.virtio-net" in got
    got = ids(spec(exclude=[{"bus": ["virtio-scsi"], "kind": "windows"}]))
    assert [i for i in got if "virtio-scsi" in i] == ["deb.bios.virtio-scsi.virtio-net", "deb.uefi.virtio-scsi.virtio-net"]
    got = ids(spec(exclude=[{"image": "win*"}]))
    assert all(i.startswith("deb.") for i in got)
    got = ids(spec(exclude=[{"id": "deb.*.virtio-scsi.*"}]))
    assert "deb.bios.virtio-scsi.virtio-net" not in got and "win2019.uefi.virtio-scsi.virtio-net" in got


def test_include_adds_cells_outside_the_lists_and_wins_over_exclude():
    s = spec(include=[{"image": "win2008r2", "bus": "ide", "nic": "e1000e"}],
             exclude=[{"image": "win2008r2"}])
    got = ids(s)
    assert [i for i in got if i.startswith("win2008r2")] == ["win2008r2.bios.ide.e1000e"]
    # keys not given range over the usual lists
    got = ids(spec(include=[{"image": "deb", "bus": "sata"}]))
    assert "deb.bios.sata.virtio-net" in got and "deb.uefi.sata.virtio-net" in got
    # an include that repeats an existing cell adds nothing
    assert len(ids(spec(include=[{"image": "deb"}]))) == len(ids(spec()))


def test_timeouts_last_rule_wins_and_known_issues():
    s = spec(
        timeouts={"default": 100, "rules": [{"match": {"kind": "windows"}, "seconds": 500},
                                              {"match": {"image": "win2008r2"}, "seconds": 700}]},
        known_issues=[{"match": {"image": "win2019", "bus": "virtio-scsi"}, "reason": "bug 42", "stop_code": "0x7B"}],
    )
    cells = {c.id: c for c in expand(s)}
    assert cells["deb.bios.virtio-blk.virtio-net"].timeout == 100
    assert cells["win2019.uefi.virtio-blk.virtio-net"].timeout == 500
    assert cells["win2008r2.bios.virtio-blk.virtio-net"].timeout == 700
    assert cells["win2019.uefi.virtio-scsi.virtio-net"].known_issue == "bug 42"
    assert cells["win2019.uefi.virtio-blk.virtio-net"].known_issue is None
    assert s.known_issues[0].stop_code == 0x7B


def test_select_by_glob():
    cells = expand(spec())
    assert [c.id for c in select(cells, ["*.virtio-scsi.*"])] == [c.id for c in cells if "virtio-scsi" in c.id]
    assert select(cells, []) == cells
