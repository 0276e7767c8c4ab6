"""Which kind of file the first bytes say: metadata must look like text, binary never does."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from h2k.inputs.formats import sniff


def _sniff_bytes(tmp_path: Path, data: bytes) -> str:
    f = tmp_path / "f"
    f.write_bytes(data)
    return sniff(f)


def test_xml_in_utf8_utf8_bom_and_utf16(tmp_path: Path) -> None:
    doc = '<?xml version="1.0"?>\n<configuration><properties/></configuration>\n'
    assert _sniff_bytes(tmp_path, doc.encode()) == "xml"
    assert _sniff_bytes(tmp_path, b"\xef\xbb\xbf" + doc.encode()) == "xml"
    assert _sniff_bytes(tmp_path, b"\xff\xfe" + doc.encode("utf-16-le")) == "xml"
    assert _sniff_bytes(tmp_path, b"\xfe\xff" + doc.encode("utf-16-be")) == "xml"
    assert _sniff_bytes(tmp_path, b"  \n<Envelope xmlns='x'/>") == "xml"


def test_json_object(tmp_path: Path) -> None:
    assert _sniff_bytes(tmp_path, b'{\n  "name": "vm"\n}\n') == "json"
    assert _sniff_bytes(tmp_path, b"{}") == "json"


def test_a_stray_bracket_before_binary_is_raw(tmp_path: Path) -> None:
    assert _sniff_bytes(tmp_path, b"<\x00\x01\x02" + bytes(range(256)) * 4) == "raw"
    assert _sniff_bytes(tmp_path, b"{\x9c\x00" + bytes(1021)) == "raw"
    assert _sniff_bytes(tmp_path, b"\xff\xfe\x00\x01\x02\x03" + bytes(1018)) == "raw"


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=64, max_size=1024))
def test_random_bytes_with_a_control_byte_up_front_are_never_metadata(tmp_path_factory, data: bytes) -> None:
    # NULs early on rule text out in UTF-8 and UTF-16 alike, wherever the generator puts brackets or a BOM.
    data = data[:10] + bytes(4) + data[14:]
    kind = _sniff_bytes(tmp_path_factory.mktemp("s"), data)
    assert kind not in ("xml", "json")
