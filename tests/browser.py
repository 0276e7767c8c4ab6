"""Debian's headless Chromium for the tests: render a page as a browser does (DOM, screenshot).

Also a minimal PNG reader and writer (zlib + struct), so a test can read the colours of a
screenshot and draw a test screendump without an imaging library.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

# Headless, offline and quiet: no sandbox (root in CI), no GPU, no first-run or network chatter.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
TIMEOUT = 120  # one page; under load a cold Chromium start takes seconds, not minutes


class Chromium:
    def __init__(self, exe: str) -> None:
        self.exe = exe

    def _run(self, page: Path, *extra: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="h2k-chromium-") as profile:
            proc = subprocess.Popen([self.exe, *FLAGS, f"--user-data-dir={profile}", *extra,
                                     Path(page).resolve().as_uri()],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=TIMEOUT)
            finally:  # Chromium forks helpers into its session: none may outlive the call
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if proc.returncode != 0:
            raise AssertionError(f"chromium exited {proc.returncode}: {err[-2000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def dom(self, page: Path) -> str:
        """The DOM after loading ``page``, serialised (``--dump-dom``)."""
        return self._run(page, "--dump-dom").stdout

    def screenshot(self, page: Path, png: Path, size: tuple[int, int] = (1400, 1000)) -> Path:
        self._run(page, f"--screenshot={Path(png).resolve()}", f"--window-size={size[0]},{size[1]}")
        if not Path(png).is_file():
            raise AssertionError(f"chromium wrote no screenshot {png}")
        return Path(png)


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# --- the DOM ----------------------------------------------------------------------------------


class Elements(HTMLParser):
    """Every element of a serialised DOM: (tag, attributes), plus the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_attr(self, name: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if name in a]

    def tags(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag]


# --- PNG ----------------------------------------------------------------------------------------


def png_pixels(path: Path) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, RGB pixels) of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    pos, idat, width = 8, b"", 0
    height = depth = ctype = interlace = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(line)
        prev = line
    pixels = [(row[i], row[i + 1], row[i + 2]) for row in rows for i in range(0, stride, bpp)]
    return width, height, pixels


def colour_counts(path: Path) -> Counter:
    return Counter(png_pixels(path)[2])


def write_png(path: Path, width: int, height: int, rgb: tuple[int, int, int]) -> Path:
    """A plain one-colour RGB PNG (a stand-in screendump whose colour a screenshot can be searched for)."""
    row = b"\x00" + bytes(rgb) * width
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
              (b"IDAT", zlib.compress(row * height)), (b"IEND", b"")]
    out = b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        for kind, body in chunks)
    Path(path).write_bytes(out)
    return Path(path)
