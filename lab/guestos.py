"""Which OS family a disk holds, when the caller does not say: libguestfs inspection.

One read-only appliance launch (20-30 s under TCG), so callers ask only when they must
(``h2k boot IMAGE`` without ``--os``). The matrix and the pytest plugin know the kind.
"""

from __future__ import annotations

from pathlib import Path

from h2k import accel, overlay
from h2k.errors import InputError

FAMILIES = {"windows": "windows", "linux": "linux"}


def os_family_of(image: Path) -> tuple[str, str]:
    """("windows" | "linux", what inspection found, e.g. "linux debian 12") for ``image``.

    InputError when there is no operating system or one the lab has no defaults for.
    """
    import guestfs

    fmt = overlay.image_format(image)  # InputError for a file qemu-img cannot read
    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        g.add_drive_opts(str(image), format=fmt, readonly=True)
        g.launch()
        roots = g.inspect_os()
        found = []
        for root in roots:
            kind = g.inspect_get_type(root)
            found.append(f"{kind} {g.inspect_get_distro(root)} {g.inspect_get_major_version(root)}".strip())
            if kind in FAMILIES:
                return FAMILIES[kind], found[-1]
    except RuntimeError as exc:
        raise InputError(f"{image}: libguestfs cannot inspect it: {str(exc).splitlines()[0]}") from None
    finally:
        g.close()
    what = ", ".join(found) or "no operating system"
    raise InputError(f"{image}: cannot tell the OS family (libguestfs inspection found {what}): give --os")
