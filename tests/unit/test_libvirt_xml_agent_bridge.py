"""The libvirt backend's agent bridge: the lab's real AgentClient speaks to it over a real
UNIX socket; the two libvirt calls behind it are replaced by a scripted agent here (the
bridge against a real guest agent under libvirt is proven in tests/boot/test_libvirt_backend.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt")

from lab.agent import AgentClient, AgentError, AgentTimeout  # noqa: E402
from lab.backend_libvirt import AgentBridge  # noqa: E402


class ScriptedAgent:
    def __init__(self) -> None:
        self.up = False
        self.calls: list[tuple[dict, int]] = []
        self.shutdowns: list[str] = []

    def command(self, text: str, timeout: int) -> str:
        msg = json.loads(text)
        self.calls.append((msg, timeout))
        if not self.up:
            raise libvirt.libvirtError("Guest agent is not responding: QEMU guest agent is not connected")
        if msg["execute"] == "guest-ping":
            return json.dumps({"return": {}})
        if msg["execute"] == "guest-get-osinfo":
            return json.dumps({"return": {"id": "h2k-tinyguest", "pretty-name": "tiny"}})
        raise libvirt.libvirtError(f"internal error: unable to execute QEMU agent command '{msg['execute']}'")


@pytest.fixture
def bridge(tmp_path: Path):
    agent = ScriptedAgent()
    b = AgentBridge(tmp_path / "agent.sock", None, command_timeout=7, agent_command=agent.command,
                    shutdown=agent.shutdowns.append)
    b.start()
    yield b, agent
    b.stop()


def test_sync_waits_for_the_agent_then_commands_pass_through(bridge, tmp_path: Path) -> None:
    b, agent = bridge
    client = AgentClient(b.path, tmp_path / "agent.jsonl")
    client.connect(timeout=2)
    with pytest.raises(AgentTimeout):
        client.sync(timeout=0.5)  # agent not connected: silence, like an empty channel
    agent.up = True
    client.sync(timeout=2)
    client.ping()
    assert client.osinfo()["id"] == "h2k-tinyguest"
    assert agent.calls[-1] == ({"execute": "guest-get-osinfo"}, 7)
    with pytest.raises(AgentError, match="unable to execute QEMU agent command 'guest-get-devices'"):
        client.devices()
    client.shutdown("powerdown")
    client.ping()  # still answering in order after a reply-less command
    assert agent.shutdowns == ["powerdown"]
    client.close()


def test_answer_shapes() -> None:
    agent = ScriptedAgent()
    agent.up = True
    b = AgentBridge.__new__(AgentBridge)
    b.command_timeout, b._agent, b._shutdown = 5, agent.command, agent.shutdowns.append
    assert b.answer(b'{"execute": "guest-sync-delimited", "arguments": {"id": 42}}') == b'\xff{"return": 42}\n'
    assert b.answer(b'{"execute": "guest-sync", "arguments": {"id": 7}}') == b'{"return": 7}\n'
    assert json.loads(b.answer(b"{not json"))["error"]["desc"] == "JSON parse error"
    assert b.answer(b"") is None
    assert b.answer(b'{"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}') is None
    assert agent.shutdowns == ["reboot"]
