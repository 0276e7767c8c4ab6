"""The Linux pipeline: inspect -> fix -> verify -> rollback for disks that are not Windows.

Public API (what ``h2k inspect|fix|verify`` dispatch to for a Linux disk, and
what ``h2k linux ...`` calls):

- ``is_linux_guest(g)``: a launched libguestfs handle holds a Linux root.
- ``inspect_image(image) -> LinuxFacts``
- ``fix_image(image, output=None, in_place=False) -> LinuxFixReport``
- ``verify_image(image, bus) -> LinuxVerifyReport``
- ``rollback_image(image) -> LinuxRollbackReport``
"""

from __future__ import annotations

from h2k.linux.fix import fix_image
from h2k.linux.inspect import inspect_image, is_linux_guest
from h2k.linux.rollback import rollback_image
from h2k.linux.verify import verify_image

__all__ = ["is_linux_guest", "inspect_image", "fix_image", "verify_image", "rollback_image"]
