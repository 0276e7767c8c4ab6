"""QEMU guest agent client over the host side of the virtio-serial channel.

The channel is a plain byte pipe that may hold stale bytes from an earlier
session (or a request the agent never read), so every session starts with
``guest-sync-delimited``: the agent answers with a 0xFF byte before its JSON,
which lets the client discard everything before it. Commands are JSON lines.
Backend-independent: it needs only the UNIX socket path (QEMU's chardev, or
libvirt's channel source path).
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

from lab.unixsock import connect_unix


# The guest writes this channel: a reply longer than this without a line end ends the session
# instead of growing the lab's memory (guest-exec output and device lists are far smaller).
MAX_MESSAGE = 16 << 20


class AgentError(Exception):
    pass


class AgentTimeout(AgentError):
    pass


class AgentClient:
    def __init__(self, path: str | Path, log_path: Path | None = None) -> None:
        self.path = str(path)
        self.log_path = log_path
        self._sock: socket.socket | None = None
        self._buf = b""

    def connect(self, timeout: float = 5.0) -> None:
        try:
            self._sock = connect_unix(self.path, timeout)
        except OSError as exc:
            raise AgentError(f"cannot connect to the agent socket {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def interrupt(self) -> None:
        """Drop the channel under a read or write in another thread, so it fails at once
        (the guest rebooted: its agent will not answer this session)."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "AgentClient":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol ------------------------------------------------------------
    def _send(self, msg: dict[str, Any], delimit: bool = False) -> None:
        if self._sock is None:
            raise AgentError("agent not connected")
        self._log("out", msg)
        try:
            self._sock.sendall((b"\xff" if delimit else b"") + json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise AgentError(f"agent channel closed: {exc}") from None

    def _recv_line(self, deadline: float) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout("guest agent did not answer in time")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise AgentTimeout("guest agent did not answer in time") from None
            except OSError as exc:
                raise AgentError(f"agent channel closed: {exc}") from None
            if not chunk:
                raise AgentError("agent channel closed")
            self._buf += chunk
            if b"\n" not in self._buf and len(self._buf) > MAX_MESSAGE:
                self._buf = b""
                raise AgentError(f"the guest agent sent more than {MAX_MESSAGE} bytes without a line end")
        line, self._buf = self._buf.split(b"\n", 1)
        if len(line) > MAX_MESSAGE:
            raise AgentError(f"the guest agent sent a reply of {len(line)} bytes (more than {MAX_MESSAGE})")
        return line

    def sync(self, timeout: float = 5.0) -> None:
        """guest-sync-delimited: flush stale bytes, agree on the stream position."""
        token = random.randint(1, 2**31 - 1)
        deadline = time.monotonic() + timeout
        self._buf = b""
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}}, delimit=True)
        while True:
            line = self._recv_line(deadline)
            if b"\xff" in line:
                line = line[line.rindex(b"\xff") + 1:]
            line = line.strip()
            if not line:
                continue
            msg = _json_object(line)
            if msg is None:
                continue
            self._log("in", msg)
            if msg.get("return") == token:
                return

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        deadline = time.monotonic() + timeout
        while True:
            line = self._recv_line(deadline).lstrip(b"\xff").strip()
            if not line:
                continue
            reply = _json_object(line)
            if reply is None:
                continue
            self._log("in", reply)
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {"desc": reply["error"]}
                raise AgentError(f"{command}: {err.get('class')}: {err.get('desc')}")
            if "return" in reply:
                return reply["return"]

    # -- commands ------------------------------------------------------------
    def ping(self, timeout: float = 5.0) -> None:
        self.execute("guest-ping", timeout=timeout)

    def osinfo(self) -> dict[str, Any]:
        return self.execute("guest-get-osinfo")

    def interfaces(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        return self.execute("guest-network-get-interfaces", timeout=timeout)

    def devices(self) -> list[dict[str, Any]]:
        return self.execute("guest-get-devices")

    def exec(self, path: str, args: list[str] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Run a program in the guest and wait for it; returns exitcode, out, err (decoded)."""
        started = self.execute("guest-exec", {"path": path, "arg": args or [], "capture-output": True})
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise AgentError(f"guest-exec: no pid in the agent's reply {str(started)[:80]!r}")
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            st = self.execute("guest-exec-status", {"pid": pid})
            if not isinstance(st, dict):
                raise AgentError(f"guest-exec-status: not an object: {str(st)[:80]!r}")
            if st.get("exited"):
                return {
                    "exitcode": st.get("exitcode"),
                    "signal": st.get("signal"),
                    "out": _b64_text(st.get("out-data", "")),
                    "err": _b64_text(st.get("err-data", "")),
                }
            if time.monotonic() >= deadline:
                raise AgentTimeout(f"guest command {path} still running after {timeout:.0f}s")
            # guest-exec has no completion event: poll with a growing interval.
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def shutdown(self, mode: str = "powerdown") -> None:
        """guest-shutdown sends no reply on success; the proof is QMP's SHUTDOWN event."""
        self._send({"execute": "guest-shutdown", "arguments": {"mode": mode}})

    def _log(self, direction: str, msg: dict[str, Any]) -> None:
        if self.log_path:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps({"t": round(time.time(), 6), "dir": direction, "msg": msg}) + "\n")


def _b64_text(data: object) -> str:
    try:
        return base64.b64decode(str(data), validate=True).decode(errors="replace")
    except ValueError:  # binascii.Error
        raise AgentError("guest-exec-status: output is not base64") from None


def _json_object(line: bytes) -> dict[str, Any] | None:
    """A JSON object from the guest, or None for anything else (garbage, a bare value)."""
    try:
        msg = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return msg if isinstance(msg, dict) else None


def ipv4_addresses(interfaces: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{interface name: [IPv4 addresses]} for non-loopback interfaces."""
    out: dict[str, list[str]] = {}
    for itf in interfaces or []:
        name = itf.get("name", "?")
        if name == "lo" or "loopback" in name.lower():
            continue
        addrs = [a["ip-address"] for a in itf.get("ip-addresses", []) or []
                 if a.get("ip-address-type") == "ipv4" and not a.get("ip-address", "").startswith("127.")]
        if addrs:
            out[name] = addrs
    return out


def ping_command(osinfo: dict[str, Any], gateway: str) -> tuple[str, list[str]]:
    """The guest command that pings the gateway once, for the guest's OS family."""
    if str(osinfo.get("id", "")).lower() == "mswindows":
        return "ping.exe", ["-n", "1", "-w", "3000", gateway]
    return "ping", ["-c", "1", "-W", "3", gateway]
