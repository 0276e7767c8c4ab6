"""Is there a resumable Windows image in ``hiberfil.sys``? (hibernation and Fast Startup blockers)

Windows writes its memory image to ``hiberfil.sys`` and the header's
signature last: ``HIBR`` (``hibr`` before Windows 8) marks a complete image
the boot manager will resume, ``RSTR`` one whose resume has begun. After a
resume the header is invalidated (``wake`` on older Windows, zeroed on
Windows 8 and later), and a full shutdown writes no image. Fast Startup
(``HiberbootEnabled``=1) makes an ordinary shutdown a hybrid one that leaves a
``HIBR`` image of the kernel session -- with the NTFS volumes' state in it --
so a disk is only unsafe to edit when the header says an image is there;
``HiberbootEnabled``=1 on a disk that was shut down fully is not a blocker.
ntfs-3g draws the same line: it refuses a read-write mount for ``hibr``/``HIBR``.
"""

from __future__ import annotations

from h2k.facts import Blocker

RESUMABLE = {b"hibr", b"rstr"}  # compared in lower case: HIBR/hibr, RSTR/rstr
FULL_SHUTDOWN = "shut it down with 'shutdown /s /t 0' (a full shutdown, not Fast Startup)"


def resumable(head: bytes) -> bool:
    """True when a hiberfil.sys header (its first bytes) holds an image Windows would resume."""
    return head[:4].lower() in RESUMABLE


def blockers(head: bytes | None, hiberboot: bool) -> list[Blocker]:
    """The blocker for a hiberfil.sys header (None: no hiberfil.sys) and the HiberbootEnabled setting."""
    if head is None or not resumable(head):
        return []
    sig = head[:4].decode("ascii", "replace")
    if hiberboot:
        return [Blocker("fast-startup", f"Fast Startup left a hibernated kernel session (HiberbootEnabled=1, hiberfil.sys "
                                        f"header {sig!r}): boot Windows and {FULL_SHUTDOWN}, or run 'powercfg /h off' "
                                        "and shut it down")]
    return [Blocker("hibernated", f"Windows is hibernated (hiberfil.sys header {sig!r}): boot it (it resumes) and "
                                  f"{FULL_SHUTDOWN}")]
