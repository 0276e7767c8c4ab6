"""Reading the tiny guest's boot counter (lab.tinyguest): what the guest printed, and what the
disk holds as qemu-img reads it (an oracle outside the guest's own shell code)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from lab import tinyguest


def printed_counts(serial_log: Path) -> set[str]:
    """The boot counts the guest printed on its console (``H2K-BOOT-COUNT=<n>``)."""
    return set(re.findall(r"H2K-BOOT-COUNT=(\d+)", Path(serial_log).read_text(errors="replace")))


def counter_line(image: Path) -> str:
    """The counter line in ``image``'s reserved sector, read by qemu-img."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "head.raw"  # the disk up to the counter's sector (qemu-img dd's skip differs by version)
        subprocess.run(["qemu-img", "dd", "-U", "-O", "raw", f"if={image}", f"of={out}", "bs=512",
                        f"count={tinyguest.COUNTER_SECTOR + 1}"], check=True, capture_output=True)
        return out.read_bytes()[tinyguest.COUNTER_SECTOR * 512:].split(b"\n")[0].decode()
