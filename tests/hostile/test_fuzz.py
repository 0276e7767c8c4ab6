"""Hypothesis-driven fuzzing of every reader of untrusted bytes: never a traceback, never unbounded memory.

Each reader may fail only with its documented error (InputError for disks and metadata,
ReplayError for hive logs, AgentError for the guest agent; the QMP reader thread just ends),
and every size taken from the input is bounded: a hostile value must not make the reader
allocate what it claims. Inputs are mutations of valid documents (so the fuzzer gets past the
first check) and plain random bytes. Examples are derandomized (the same in every CI run) and
few, so the whole module takes seconds.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h2k import hivelog
from lab.testbed import hivelog_writer
from h2k.errors import H2KError, InputError
from h2k.image import open_image
from h2k.inputs import cloud, formats, hyperv, ovf, qcow2, vmx
from h2k.linux import initrd
from lab import agent as agentmod
from lab import qmp as qmpmod
from matrix.reports import xml_safe

# H2K_FUZZ_EXAMPLES=N fuzzes deeper, with fresh random examples (by hand, not in make test).
DEEP = int(os.environ.get("H2K_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 120, deadline=None, derandomize=not DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_QEMU = settings(FUZZ, max_examples=DEEP or 30)  # qemu-img runs for what passes h2k's own checks
FUZZ_SLOW = settings(FUZZ, max_examples=DEEP or 50)  # recursive JSON, whole report writes

# Values a hostile document would put in a number field.
NASTY_NUMBERS = st.sampled_from(["0", "-1", "1e9", "²", "٣", "0x10", " 7 ", "9" * 30, "9" * 5000, "",
                                 "18446744073709551616", "4096", "two"])
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80)


def mutate(doc: str, spots: list[str], values: list[str]) -> str:
    for spot, value in zip(spots, values):
        doc = doc.replace(spot, value, 1)
    return doc


# ---------------------------------------------------------------- VMDK descriptors

VMDK = ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID={PCID}\ncreateType="{CT}"\n{HINT}\n'
        '# Extent description\nRW {S1} {T1} "{F1}" {O1}\nRW {S2} ZERO\n\nddb.adapterType = "{AD}"\n')


@FUZZ
@given(st.lists(st.one_of(NASTY_NUMBERS, TEXT, st.sampled_from(['x"y', "FLAT", "SPARSE", "monolithicFlat",
                                                                  'parentFileNameHint="', "\x00", "\n"])),
                min_size=9, max_size=9))
def test_vmdk_descriptor(values):
    text = mutate(VMDK, ["{PCID}", "{CT}", "{HINT}", "{S1}", "{T1}", "{F1}", "{O1}", "{S2}", "{AD}"], values)
    try:
        desc = formats.parse_vmdk_descriptor(text)
    except InputError:
        return
    assert all(0 <= e.sectors < 10**20 and 0 <= e.offset < 10**20 for e in desc.extents)


@FUZZ_QEMU
@given(desc_off=st.integers(0, 2**64 - 1), desc_size=st.integers(0, 2**64 - 1), body=st.binary(max_size=2048))
def test_sparse_vmdk_header(tmp_path_factory, desc_off, desc_size, body):
    f = tmp_path_factory.mktemp("vmdk") / "d.vmdk"
    head = b"KDMV" + struct.pack("<II", 1, 3) + bytes(16) + struct.pack("<QQ", desc_off, desc_size)
    f.write_bytes(head + body)
    with pytest.raises(InputError):  # (random bytes are never a usable sparse VMDK)
        open_image(f)


# ---------------------------------------------------------------- qcow2 headers


@FUZZ
@given(version=st.sampled_from([1, 2, 3, 4, 2**32 - 1]), backing_off=st.integers(0, 2**64 - 1),
       backing_len=st.integers(0, 2**32 - 1), cluster_bits=st.integers(0, 64), header_len=st.integers(0, 2**32 - 1),
       exts=st.lists(st.tuples(st.sampled_from([0xE2792ACA, 0x44415441, 0x6803F857, 7]), st.integers(0, 2**32 - 1),
                               st.binary(max_size=64)), max_size=4),
       tail=st.binary(max_size=512))
def test_qcow2_header(version, backing_off, backing_len, cluster_bits, header_len, exts, tail):
    head = b"QFI\xfb" + struct.pack(">IQII", version, backing_off, backing_len, cluster_bits) + bytes(52)
    head += struct.pack(">QQQII", 0, 0, 0, 4, header_len)
    for typ, length, data in exts:
        head += struct.pack(">II", typ, length) + data
    head += tail
    try:
        h = qcow2.parse_header(head)
    except InputError:
        return
    assert h.version in (2, 3)
    assert h.backing_file is None or 0 < len(h.backing_file.encode()) <= qcow2.MAX_BACKING_NAME


# ---------------------------------------------------------------- VHD / VHDX headers


@FUZZ_QEMU
@given(kind=st.sampled_from(["vhd", "vhd-footer", "vhdx"]), disk_type=st.integers(0, 2**32 - 1),
       noise=st.binary(min_size=0, max_size=1536), size=st.integers(0, 2**64 - 1))
def test_vhd_and_vhdx_headers(tmp_path_factory, kind, disk_type, noise, size):
    f = tmp_path_factory.mktemp("vhd") / f"d.{kind.split('-')[0]}"
    footer = b"conectix" + bytes(40) + struct.pack(">Q", size) + bytes(4) + struct.pack(">I", disk_type)
    footer = (footer + noise)[:512].ljust(512, b"\0")
    if kind == "vhd":
        data = footer + noise
    elif kind == "vhd-footer":
        data = noise.ljust(1024, b"\0") + footer
    else:
        data = b"vhdxfile" + noise
    f.write_bytes(data)
    with pytest.raises(InputError):  # crafted headers never pass as usable disks
        open_image(f)


# ---------------------------------------------------------------- OVF, VMX, Hyper-V XML, cloud JSON

OVF = """<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 {PRE}
 <References><File ovf:id="f1" ovf:href="{HREF}"/></References>
 <DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="{CAP}" ovf:capacityAllocationUnits="{UNITS}"/></DiskSection>
 <VirtualSystem ovf:id="vm"><Name>{NAME}</Name><VirtualHardwareSection>
  <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{CPUS}</rasd:VirtualQuantity></Item>
  <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:AllocationUnits>{MUNITS}</rasd:AllocationUnits><rasd:VirtualQuantity>{MEM}</rasd:VirtualQuantity></Item>
  <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType><rasd:ResourceSubType>{SUB}</rasd:ResourceSubType></Item>
  <Item><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType><rasd:Parent>3</rasd:Parent><rasd:AddressOnParent>{ADDR}</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/d1</rasd:HostResource></Item>
  <Item><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceType>10</rasd:ResourceType><rasd:Address>{MAC}</rasd:Address></Item>
 </VirtualHardwareSection></VirtualSystem>
</Envelope>"""
OVF_SPOTS = ["{PRE}", "{HREF}", "{CAP}", "{UNITS}", "{NAME}", "{CPUS}", "{MUNITS}", "{MEM}", "{SUB}", "{ADDR}", "{MAC}"]
XML_NASTY = st.sampled_from(["byte * 2^999999999", "byte * 2^30", "byte*2^64", "gigabytes", "bytes", "&lt;",
                             "<!DOCTYPE x [<!ENTITY a 'b'>]>", "<!ENTITY a 'b'>", "&a;", "<", "]]>", "../x.vmdk",
                             "/etc/passwd", "disk.vmdk", "00:50:56:aa:bb:cc", "<!-- " + "x" * 70000 + " -->"])


@FUZZ
@given(st.lists(st.one_of(NASTY_NUMBERS, XML_NASTY, TEXT), min_size=len(OVF_SPOTS), max_size=len(OVF_SPOTS)))
def test_ovf(values):
    try:
        pkg = ovf.parse(mutate(OVF, OVF_SPOTS, values), "fuzz.ovf")
    except InputError:
        return
    m = pkg.machine
    assert m.cpus is None or 0 <= m.cpus <= 1024
    assert m.memory_mib is None or 0 <= m.memory_mib <= 16 << 20


def test_an_entity_after_64_kib_of_comments_is_refused():
    # The old guard read only the first 64 KiB; defusedxml refuses a declaration anywhere.
    pad = "<!-- " + "x" * 70000 + " -->\n"
    for doc in (f'<?xml version="1.0"?>\n{pad}<!DOCTYPE Envelope [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                "<Envelope><x>&e;</x></Envelope>",):
        with pytest.raises(InputError, match="DOCTYPE or entity"):
            ovf.parse(doc, "late.ovf")
        with pytest.raises(InputError, match="DOCTYPE or entity"):
            hyperv.parse(doc.replace("Envelope", "configuration"), "late.xml")


VMX = ('.encoding = "UTF-8"\nfirmware = "{FW}"\nnumvcpus = "{CPUS}"\nmemsize = "{MEM}"\nscsi0.virtualDev = "{DEV}"\n'
       'scsi0:0.fileName = "{FILE}"\nethernet0.addressType = "{AT}"\nethernet0.address = "{MAC}"\nbios.hddOrder = "{ORD}"\n')
VMX_SPOTS = ["{FW}", "{CPUS}", "{MEM}", "{DEV}", "{FILE}", "{AT}", "{MAC}", "{ORD}"]


@FUZZ
@given(st.lists(st.one_of(NASTY_NUMBERS, TEXT, st.sampled_from(["efi", "static", "x.vmdk", '"', "\n", "\x00"])),
                min_size=len(VMX_SPOTS), max_size=len(VMX_SPOTS)))
def test_vmx(values):
    try:
        m = vmx.parse(mutate(VMX, VMX_SPOTS, values), Path("/nowhere"), "fuzz.vmx")
    except InputError:
        return
    assert m.cpus is None or 1 <= m.cpus <= 1024


HYPERV = ("<configuration><properties><subtype type='integer'>{SUB}</subtype><name>{NAME}</name></properties>"
          "<settings><processors><count>{CPUS}</count></processors><memory><bank><size>{MEM}</size></bank></memory>"
          "</settings><_83f8638b-8dca-4152-9eda-2ca8b33039b4_><controller0><drive0><pathname>{PATH}</pathname>"
          "</drive0></controller0></_83f8638b-8dca-4152-9eda-2ca8b33039b4_><_nic_><address>{MAC}</address></_nic_>"
          "<MemoryStartupBytes>{BYTES}</MemoryStartupBytes></configuration>")
HYPERV_SPOTS = ["{SUB}", "{NAME}", "{CPUS}", "{MEM}", "{PATH}", "{MAC}", "{BYTES}"]


@FUZZ
@given(st.lists(st.one_of(NASTY_NUMBERS, XML_NASTY, TEXT), min_size=len(HYPERV_SPOTS), max_size=len(HYPERV_SPOTS)))
def test_hyperv_xml(values):
    try:
        hyperv.parse(mutate(HYPERV, HYPERV_SPOTS, values), "fuzz.xml")
    except InputError:
        return


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), TEXT),
                       lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4), max_leaves=12)


@FUZZ_SLOW
@given(st.fixed_dictionaries({}, optional={k: JSONISH for k in ("firmware", "generation", "secure_boot", "cpus",
                                                                  "memory_mib", "memory_mb", "nics", "mac", "disks",
                                                                  "name", "guest_os")}))
def test_cloud_sidecar(data):
    try:
        cloud.parse(data, Path("/nowhere"), "fuzz.json")
    except InputError:
        return


# ---------------------------------------------------------------- the hive-log reader (public entry points)

PAGE = 4096


def _primary(seq1: int, seq2: int, hbins: bytes) -> bytes:
    base = bytearray(PAGE)
    base[:4] = b"regf"
    return bytes(hivelog.with_base_fields(base, seq1=seq1, seq2=seq2, file_type=0, hbins_size=len(hbins))) + hbins


@FUZZ
@given(seq=st.integers(0, 2**32 - 1), hbins_size=st.integers(0, 2**32 - 1),
       pages=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)), max_size=3),
       flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=3), extra=st.binary(max_size=600))
def test_hive_log_replay(seq, hbins_size, pages, flips, extra):
    primary = _primary(seq, max(seq - 1, 0), bytes(PAGE))
    log = bytearray(hivelog_writer.log_header(primary, seq))
    log += hivelog_writer.log_entry(seq, hbins_size, pages) + extra
    for at, value in flips:
        if at < len(log):
            log[at] = value
    assert hivelog.parse_log(bytes(log)).kind in ("new", "old", "empty", "invalid")
    try:
        out = hivelog.replay(primary, {"SYSTEM.LOG1": bytes(log)})
    except hivelog.ReplayError:
        return
    # The hive grows by no more than the bytes the log holds (a crafted size is not a reason to).
    assert len(out.data) <= len(primary) + len(log)


@FUZZ
@given(st.binary(max_size=4096))
def test_hive_log_random_bytes(data):
    assert hivelog.parse_log(data).kind in ("new", "old", "empty", "invalid")
    try:
        hivelog.replay(_primary(2, 1, bytes(PAGE)), {"SYSTEM.LOG1": b"regf" + data})
    except hivelog.ReplayError:
        pass


# ---------------------------------------------------------------- initramfs (cpio + compression)


def _newc(name: bytes, data: bytes, namesize: str | None = None, filesize: str | None = None) -> bytes:
    hdr = b"070701" + b"0" * 48 + (filesize or f"{len(data):08x}").encode() + b"0" * 32
    hdr += (namesize or f"{len(name) + 1:08x}").encode() + b"0" * 8
    body = hdr + name + b"\0"
    body += b"\0" * (-len(body) % 4) + data
    return body + b"\0" * (-len(body) % 4)


@FUZZ
@given(name=st.binary(max_size=40), data=st.binary(max_size=64),
       namesize=st.one_of(st.none(), st.text("0123456789abcdefxyz-+ ", min_size=8, max_size=8)),
       filesize=st.one_of(st.none(), st.text("0123456789abcdefxyz-+ ", min_size=8, max_size=8)),
       compress=st.booleans(), junk=st.binary(max_size=64))
def test_initramfs(name, data, namesize, filesize, compress, junk):
    blob = _newc(name, data, namesize, filesize) + _newc(b"TRAILER!!!", b"")
    blob = gzip.compress(blob) + junk if compress else blob + junk
    try:
        initrd.list_files(blob)
    except InputError:
        pass
    except H2KError as exc:  # only a decompressor missing on the host is an engine error
        assert "is not installed" in str(exc)


def test_initramfs_decompression_bomb_is_cut_off(monkeypatch):
    monkeypatch.setattr(initrd, "MAX_UNPACKED", 1 << 20)
    bomb = gzip.compress(_newc(b"big", bytes(4 << 20)) + _newc(b"TRAILER!!!", b""))
    assert len(bomb) < 16 << 10
    with pytest.raises(InputError, match="decompression bomb"):
        initrd.list_files(bomb)
    import lzma

    with pytest.raises(InputError, match="decompression bomb"):
        initrd.list_files(lzma.compress(bytes(4 << 20)))


# ---------------------------------------------------------------- the agent and QMP readers


def _feed(chunks: list[bytes]) -> socket.socket:
    """A client socket whose peer (the "guest") sends ``chunks`` then closes."""
    ours, theirs = socket.socketpair()

    def guest() -> None:
        try:
            for c in chunks:
                theirs.sendall(c)
        except OSError:
            pass
        finally:
            theirs.close()

    threading.Thread(target=guest, daemon=True).start()
    return ours


REPLIES = st.lists(st.one_of(st.binary(max_size=200), st.sampled_from([
    b'{"return": {}}\n', b'{"return": 42}\n', b"\xff{}\n", b'{"error": "x"}\n', b'{"error": {"class": 1}}\n',
    b"[1,2]\n", b"null\n", b'"str"\n', b'{"return": {"pid": "x"}}\n', b'{"return": {"exited": true, "out-data": "!"}}\n',
    b"\xff\xfe\n", b'{"return": {"pid": 7}}\n'])), max_size=8)


@FUZZ
@given(REPLIES)
def test_agent_reader(chunks):
    client = agentmod.AgentClient("/nonexistent")
    client._sock = _feed(chunks)
    try:
        for call in (lambda: client.sync(timeout=0.5), lambda: client.execute("guest-ping", timeout=0.5),
                     lambda: client.exec("/bin/true", timeout=0.5)):
            try:
                call()
            except agentmod.AgentError:
                pass
    finally:
        client.close()


def test_agent_reader_is_bounded(monkeypatch):
    monkeypatch.setattr(agentmod, "MAX_MESSAGE", 64 << 10)
    client = agentmod.AgentClient("/nonexistent")
    client._sock = _feed([b"x" * (1 << 20)])  # a megabyte without a line end
    t0 = time.monotonic()
    with pytest.raises(agentmod.AgentError, match="without a line end"):
        client.execute("guest-ping", timeout=30)
    assert time.monotonic() - t0 < 10 and len(client._buf) == 0
    client.close()


def _qmp_read(chunks: list[bytes]) -> tuple[list, list]:
    client = qmpmod.QMPClient("/nonexistent")
    events: list = []
    errors: list = []
    old = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        client.add_listener(events.append)
        reader = threading.Thread(target=client._read_loop, args=(_feed(chunks).makefile("rb"),))
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive()
    finally:
        threading.excepthook = old
    return events, errors


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=200), st.sampled_from([
    b'{"event": "STOP"}\n', b"[1]\n", b"7\n", b'{"id": [1]}\n', b'{"id": "h2k-1", "return": {}}\n', b"\xff\n"])),
    max_size=8))
def test_qmp_reader(chunks):
    events, errors = _qmp_read(chunks)
    assert errors == [] and events and events[-1]["event"] == "__closed__"
    assert all(isinstance(e, dict) for e in events)


def test_qmp_reader_is_bounded(monkeypatch):
    monkeypatch.setattr(qmpmod, "MAX_MESSAGE", 64 << 10)
    events, errors = _qmp_read([b'{"event": "STOP"}\n', b"y" * (1 << 20), b'{"event": "LATE"}\n'])
    assert errors == [] and [e["event"] for e in events] == ["STOP", "__closed__"]


# ---------------------------------------------------------------- guest text in JUnit


@FUZZ_SLOW
@given(st.text(max_size=200))
def test_guest_text_keeps_junit_valid(tmp_path_factory, reason):
    from xml.etree import ElementTree as ET

    from matrix.expand import expand
    from matrix.load import build_spec
    from matrix.model import CellResult, RunResults
    from matrix.reports import write_all

    spec = build_spec({"name": "m", "images": [{"name": "g", "kind": "linux", "path": "/g", "firmware": ["bios"]}],
                       "bus": ["virtio-blk"]}, "m.yaml")
    cell = expand(spec)[0]
    out = tmp_path_factory.mktemp("junit")
    write_all(RunResults(matrix="m", started="", finished="", cells=[CellResult(cell, "failed", reason=reason)]), out)
    root = ET.parse(out / "junit.xml").getroot()  # expat refuses characters XML 1.0 forbids
    assert root.find(".//failure").get("message") == f"failed: {xml_safe(reason)}" if reason else True
    json.loads((out / "results.json").read_text())
