"""Watch a serial console (or the firmware debug port): strip noise, match patterns
incrementally, parse Windows EMS/SAC XML, and report evidence of success.

``ConsoleScanner`` is pure logic: feed it bytes as they arrive, it returns the
events found so far. Matches work across reads (an EMS block split over many
reads, an escape sequence cut in half). ``SocketWatcher`` reads a UNIX socket
(QEMU's chardev, libvirt's console socket) in a thread, optionally tees the raw
bytes to a log, and hands events to a callback. Backend-independent.
"""

from __future__ import annotations

import codecs
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lab import stopcodes
from lab.unixsock import connect_unix
from lab.verdict import BOOT_OK_MARKER, Expect, Pattern

# CSI (ESC [ ... final), OSC (ESC ] ... BEL/ST), two-byte ESC sequences, and charset selects.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[@-Z\\-_=>]")
# An escape sequence that may still be incomplete at the end of a chunk.
_ANSI_TAIL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*|[()])?$")
# Control characters other than newline and tab (incl. NUL fill, bell, backspace).
_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

_MACHINE_INFO = re.compile(r"<machine-info>(?P<body>.*?)</machine-info>", re.S)
_BP_OPEN = re.compile(r"<BP>")
_BP_INSTANCE = re.compile(r'<INSTANCE CLASSNAME="BLUESCREEN">(?P<body>.*?)</INSTANCE>', re.S)
_PROPERTY = re.compile(r'<PROPERTY NAME="(?P<name>[^"]+)"[^>]*>\s*<VALUE>(?P<value>.*?)</VALUE>', re.S)
_TAG = re.compile(r"<(?P<tag>[a-z-]+)>(?P<value>[^<]*)</(?P=tag)>")

# Console evidence of success (lab.verdict.EVIDENCE), scanned on every console whatever the
# expectation, so a verdict (or a timeout's reason) can say what the guest did show.
# A pattern with a ``detail`` group waits for the end of its line.
CONSOLE_EVIDENCE_PATTERNS: dict[str, list[str]] = {
    "marker": [re.escape(BOOT_OK_MARKER)],
    # agetty's prompt: "<host> login: " at the start of a line, never followed by a newline; a kernel
    # message may land right after it on the same line.
    "login": [r"^(?!Last login)(?P<host>[A-Za-z0-9][A-Za-z0-9._-]{0,62}) login: *(?=$|\[ *\d+\.\d+\])"],
    # systemd's status line for its default target; systemd 249+ names the unit first and cuts a
    # long name to the column ("multi-user.…get - Multi-User System."), so the description counts.
    "systemd-target": [r"Reached target (?P<detail>[^\n]*?(?:Multi-User System|Graphical Interface"
                       r"|multi-user\.target|graphical\.target)[^\n]*)"],
    "ems": [r"^SAC>"],  # the SAC prompt; <machine-info> is parsed apart (never inside a <BP>)
}

WINDOW = 16384  # the longest stretch a pattern may span (an EMS block is < 2 KiB)
KEEP = 65536  # text kept for matching


def clean(text: str) -> str:
    """Remove ANSI escapes, carriage returns and other control garbage."""
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CTRL.sub("", text)


@dataclass
class ConsoleEvent:
    kind: str  # "evidence" (name: an evidence name) | "failure" | "ems-bluescreen"
    name: str
    text: str
    verdict: str | None = None  # for failures: "failed" | "softfailed"
    source: str = "console"
    data: dict[str, Any] = field(default_factory=dict)
    t: float = field(default_factory=time.monotonic)
    pos: int = 0  # where in the stream it starts (events of one read are reported in stream order)


def parse_machine_info(body: str) -> dict[str, str]:
    return {m.group("tag"): m.group("value").strip() for m in _TAG.finditer(body)}


def parse_bluescreen(body: str) -> dict[str, Any]:
    """Properties of an EMS BLUESCREEN instance; STOPCODE parsed to an int."""
    props = {m.group("name"): m.group("value").strip().strip('"') for m in _PROPERTY.finditer(body)}
    out: dict[str, Any] = {"properties": props}
    raw = props.get("STOPCODE")
    if raw:
        try:
            code = stopcodes.normalize(int(raw, 16) if raw.lower().startswith("0x") else int(raw, 16))
            out["stop_code"] = code
            out["stop_name"] = stopcodes.name_of(code)
        except ValueError:
            out["stop_code_raw"] = raw
    params = [props.get(f"BUGCHECKPARAM{i}") for i in range(1, 5)]
    if any(params):
        out["params"] = params
    mi = _MACHINE_INFO.search(body)
    if mi:
        out["machine_info"] = parse_machine_info(mi.group("body"))
    return out


class ConsoleScanner:
    """Incremental matcher over one byte stream."""

    def __init__(self, expect: Expect | None = None, source: str = "console") -> None:
        expect = expect or Expect()
        self.source = source
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # raw text held back (a possibly incomplete escape)
        self.text = ""  # cleaned text, the last KEEP characters
        self._base = 0  # absolute offset of self.text[0]
        # (evidence name, compiled regex): only the console carries evidence of success.
        self._evidence: list[tuple[str, re.Pattern[str]]] = []
        if source == "console":
            for name, regexes in CONSOLE_EVIDENCE_PATTERNS.items():
                self._evidence += [(name, re.compile(r, re.M)) for r in regexes]
            self._evidence += [("pattern", re.compile(r, re.M)) for r in expect.success_patterns]
        self._failures = [(p, p.compiled()) for p in expect.all_failure_patterns() if p.applies_to(source)]
        # Per pattern: the absolute offset from which to search next.
        self._pos: dict[int, int] = {}
        self._ems_pos = 0
        self._bp_pos = 0
        self._eof = False
        self.events: list[ConsoleEvent] = []

    def feed(self, data: bytes) -> list[ConsoleEvent]:
        raw = self._pending + self._decoder.decode(data)
        tail = _ANSI_TAIL.search(raw)
        if tail and len(raw) - tail.start() < 64:
            raw, self._pending = raw[: tail.start()], raw[tail.start():]
        else:
            self._pending = ""
        # A lone CR at the end may be the first half of CRLF: hold it back too.
        if raw.endswith("\r"):
            raw, self._pending = raw[:-1], "\r" + self._pending
        self.text += clean(raw)
        if len(self.text) > KEEP * 2:
            drop = len(self.text) - KEEP
            self.text = self.text[drop:]
            self._base += drop
        found = self._scan()
        self.events.extend(found)
        return found

    # -- matching ------------------------------------------------------------
    def _search(self, key: int, rx: re.Pattern[str], one_line: bool = False) -> list[re.Match[str]]:
        """Matches of ``rx`` in the text not searched yet. ``one_line``: the pattern never spans a
        newline, so a miss resumes at the start of the last line, not a WINDOW back (a guest under
        TCG often writes a byte per read: re-searching 16 KiB per pattern per byte costs seconds)."""
        end = self._base + len(self.text)
        start = max(self._pos.get(key, 0), self._base, end - len(self.text))
        matches = []
        rel = start - self._base
        while True:
            m = rx.search(self.text, rel)
            if not m or m.end() == m.start():
                break
            if self._line_unfinished(rx, m):
                # Its detail runs to the end of what has arrived: wait for the rest of the line.
                self._pos[key] = self._base + m.start()
                return matches
            matches.append(m)
            rel = m.end()
        if matches:
            self._pos[key] = self._base + matches[-1].end()
        else:
            # Keep a window so a match still in the making is found later.
            resume = self._base + self.text.rfind("\n") + 1 if one_line else end - WINDOW
            self._pos[key] = max(start, resume)
        return matches

    def _line_unfinished(self, rx: re.Pattern[str], m: re.Match[str]) -> bool:
        """A match with a ``detail`` group that ends where the text ends may still be growing
        ("Kernel panic - not syncing: sysrq trigge" arrives before "red crash")."""
        return not self._eof and "detail" in rx.groupindex and m.end() == len(self.text)

    def finish(self) -> list[ConsoleEvent]:
        """The stream ended: report matches held back for an unfinished last line."""
        self._eof = True
        found = self._scan()
        self.events.extend(found)
        return found

    def _scan(self) -> list[ConsoleEvent]:
        out: list[ConsoleEvent] = []
        if self.source == "console":
            out += self._scan_ems()
        for i, (pat, rx) in enumerate(self._failures):
            for m in self._search(1000 + i, rx, pat.one_line):
                detail = m.groupdict().get("detail")
                out.append(ConsoleEvent("failure", pat.name, _line(m.group(0)), pat.verdict, self.source,
                                        {"detail": detail.strip()} if detail else {}, pos=self._base + m.start()))
        for i, (name, rx) in enumerate(self._evidence):
            for m in self._search(i, rx, name != "pattern"):
                data = {k: v.strip() for k, v in m.groupdict().items() if v}
                if name == "pattern":
                    data["regex"] = rx.pattern
                out.append(ConsoleEvent("evidence", name, _line(m.group(0)), source=self.source, data=data,
                                        pos=self._base + m.start()))
        if any(ev.name == "ems" and "machine_info" in ev.data for ev in out):
            # The same evidence twice in one read: keep the <machine-info>, which names the OS.
            out = [ev for ev in out if not (ev.name == "ems" and "machine_info" not in ev.data)]
        # Stream order, except that a failure shown in the same read as a success comes first:
        # when the lab looks, the guest has already failed.
        out.sort(key=lambda ev: (ev.kind == "evidence", ev.pos))
        return out

    def _scan_ems(self) -> list[ConsoleEvent]:
        out: list[ConsoleEvent] = []
        # Bugchecks first: a <BP> block also carries a <machine-info>.
        rel = max(0, self._bp_pos - self._base)
        while True:
            m = _BP_INSTANCE.search(self.text, rel)
            if not m:
                break
            info = parse_bluescreen(m.group("body"))
            code = info.get("stop_code")
            text = stopcodes.describe(code) if code is not None else "unknown stop code"
            out.append(ConsoleEvent("ems-bluescreen", "bluescreen", text, "failed", self.source, info,
                                    pos=self._base + m.start()))
            rel = m.end()
        self._bp_pos = self._base + _resume(self.text, rel, '<INSTANCE CLASSNAME="BLUESCREEN">')
        rel = max(0, self._ems_pos - self._base)
        while True:
            m = _MACHINE_INFO.search(self.text, rel)
            if not m:
                break
            rel = m.end()
            if self._inside_bp(m.start()):
                continue
            info = parse_machine_info(m.group("body"))
            out.append(ConsoleEvent("evidence", "ems", info.get("os-product", "machine-info"),
                                    source=self.source, data={"machine_info": info}, pos=self._base + m.start()))
        self._ems_pos = self._base + _resume(self.text, rel, "<machine-info>")
        return out

    def _inside_bp(self, rel: int) -> bool:
        opened = self.text.rfind("<BP>", 0, rel)
        if opened < 0:
            return False
        return self.text.rfind("</BP>", opened, rel) < 0


def _resume(text: str, rel: int, opening: str) -> int:
    """Where the next search for a block starting with ``opening`` begins: its unfinished opening
    if one is there, else just before the end (a new opening may still be arriving)."""
    opened = text.find(opening, rel)
    return opened if opened >= 0 else max(rel, len(text) - len(opening))


def _line(s: str) -> str:
    s = s.strip()
    return s if len(s) <= 300 else s[:297] + "..."


EventCallback = Callable[[ConsoleEvent], None]


class SocketWatcher:
    """Read a UNIX stream socket in a thread; scan, optionally tee, report.

    The socket must already be listening (the lab pre-opens QEMU's sockets, so
    connecting never races QEMU's start-up).
    """

    def __init__(self, path: str | Path, scanner: ConsoleScanner, on_event: EventCallback,
                 tee: Path | None = None, name: str = "console",
                 on_close: Callable[[], None] | None = None) -> None:
        self.path = str(path)
        self.scanner = scanner
        self.on_event = on_event
        self.on_close = on_close
        self.tee = tee
        self.name = name
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.bytes_read = 0

    def start(self, connect_timeout: float = 10.0) -> None:
        self._sock = connect_unix(self.path, connect_timeout)
        self._thread = threading.Thread(target=self._loop, name=f"watch-{self.name}", daemon=True)
        self._thread.start()

    def send(self, data: bytes) -> None:
        if self._sock is not None:
            self._sock.sendall(data)

    def _loop(self) -> None:
        assert self._sock is not None
        fh = open(self.tee, "ab") if self.tee else None
        try:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.bytes_read += len(chunk)
                if fh:
                    fh.write(chunk)
                    fh.flush()
                for ev in self.scanner.feed(chunk):
                    self.on_event(ev)
            for ev in self.scanner.finish():
                self.on_event(ev)
        finally:
            if fh:
                fh.close()
            if self.on_close:
                self.on_close()

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
