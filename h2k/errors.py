"""Errors that end a command with a one-line cause and a non-zero exit."""


class H2KError(Exception):
    """A failure the user can act on. str(err) is the one-line cause."""

    exit_code = 2


class InputError(H2KError):
    """The input (disk, metadata, driver pack, matrix file) is unusable."""

    exit_code = 3


class BlockerError(H2KError):
    """The guest is in a state we refuse to touch (hibernated, BitLocker, ...)."""

    exit_code = 4


class CheckFailed(H2KError):
    """A verification or gate found a failure; details were already printed."""

    exit_code = 1


def read_input_file(path, what: str = "") -> bytes:
    """The bytes of an input file, or InputError "<path>: cannot read[ what]: <reason>"."""
    from pathlib import Path

    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read{' ' + what if what else ''}: {exc.strerror}") from None
