"""A tiny, valid PE executable (PE32+ x86_64, PE32 i386) for a phony ``System32\\cmd.exe``.

libguestfs inspection reads a Windows guest's architecture from the header of
``System32\\cmd.exe`` (via ``file``), so the header must be a real one: DOS
header and stub, ``PE\\0\\0``, COFF header with the machine type, an optional
header (PE32 or PE32+) with 16 data directories, and one ``.text`` section
whose entry point is a ``ret``. The image would load; it does nothing.
"""

from __future__ import annotations

import struct

MACHINES = {
    "x86_64": (0x8664, 0x20B),  # IMAGE_FILE_MACHINE_AMD64, PE32+ magic
    "i386": (0x014C, 0x10B),  # IMAGE_FILE_MACHINE_I386, PE32 magic
}

FILE_ALIGN = 0x200
SECTION_ALIGN = 0x1000
PE_OFFSET = 0x80
SUBSYSTEM_CONSOLE = 3
_TIMESTAMP = 1546300800  # 2019-01-01 UTC: fixed, so images are reproducible

DOS_STUB_MESSAGE = b"This program cannot be run in DOS mode.\r\r\n$"


def _dos_header_and_stub() -> bytes:
    hdr = bytearray(0x40)
    hdr[0:2] = b"MZ"
    struct.pack_into("<HHHHHHHHH", hdr, 2, 0x90, 3, 0, 4, 0, 0xFFFF, 0, 0xB8, 0)
    struct.pack_into("<H", hdr, 0x18, 0x40)  # e_lfarlc >= 0x40: a "new" executable
    struct.pack_into("<I", hdr, 0x3C, PE_OFFSET)  # e_lfanew
    # The classic stub: print the message with int 21h/09h, exit with int 21h/4Ch.
    stub = bytes.fromhex("0e1fba0e00b409cd21b8014ccd21") + DOS_STUB_MESSAGE
    body = bytes(hdr) + stub
    return body + b"\0" * (PE_OFFSET - len(body))


SUBSYSTEM_NATIVE = 1  # drivers (.sys)
SUBSYSTEM_EFI_APPLICATION = 10  # bootmgfw.efi, bootx64.efi


def make_pe(
    arch: str = "x86_64",
    *,
    os_version: tuple[int, int] = (10, 0),
    description: str = "",
    subsystem: int = SUBSYSTEM_CONSOLE,
) -> bytes:
    """A console PE image for ``arch`` (``x86_64`` or ``i386``).

    ``os_version`` fills the OS/subsystem version fields (6.1 for Windows 7,
    10.0 for 10/11/2016+). ``description`` is appended to the section as
    recognisable text (e.g. "phony cmd.exe for hyper2kvm"). ``subsystem``:
    console (3, the default), native (1) for drivers, EFI application (10).
    """
    if arch not in MACHINES:
        raise ValueError(f"unsupported PE architecture {arch!r} (want one of {sorted(MACHINES)})")
    machine, magic = MACHINES[arch]
    pe32plus = magic == 0x20B

    code = b"\x31\xc0\xc3"  # xor eax, eax; ret  (exit code 0)
    text = code + b"\0" * 13 + description.encode("ascii", "replace")
    text_raw = text + b"\0" * (-len(text) % FILE_ALIGN)

    opt_size = 0xF0 if pe32plus else 0xE0
    headers_len = PE_OFFSET + 4 + 20 + opt_size + 40
    size_of_headers = headers_len + (-headers_len % FILE_ALIGN)
    text_rva = SECTION_ALIGN
    size_of_image = text_rva + len(text) + (-len(text) % SECTION_ALIGN)

    # COFF characteristics: EXECUTABLE_IMAGE, plus LARGE_ADDRESS_AWARE (64-bit) or 32BIT_MACHINE.
    characteristics = 0x0002 | (0x0020 if pe32plus else 0x0100)
    coff = struct.pack("<HHIIIHH", machine, 1, _TIMESTAMP, 0, 0, opt_size, characteristics)

    major, minor = os_version
    image_base = 0x140000000 if pe32plus else 0x400000
    std = struct.pack("<HBBIIII", magic, 14, 0, len(text_raw), 0, 0, text_rva)  # linker 14.0, entry point
    if pe32plus:
        std += struct.pack("<I", text_rva)  # BaseOfCode
        win = struct.pack("<Q", image_base)
    else:
        std += struct.pack("<II", text_rva, 0)  # BaseOfCode, BaseOfData
        win = struct.pack("<I", image_base)
    # DllCharacteristics: DYNAMIC_BASE | NX_COMPAT | TERMINAL_SERVER_AWARE
    dll_chars = 0x0040 | 0x0100 | 0x8000
    win += struct.pack(
        "<IIHHHHHHIIIIHH",
        SECTION_ALIGN,
        FILE_ALIGN,
        major,
        minor,  # OS version
        major,
        minor,  # image version
        major,
        minor,  # subsystem version
        0,  # Win32VersionValue
        size_of_image,
        size_of_headers,
        0,  # checksum (only drivers and boot files need one)
        subsystem,
        dll_chars,
    )
    stack = (0x100000, 0x1000, 0x100000, 0x1000)
    win += struct.pack("<QQQQ" if pe32plus else "<IIII", *stack)
    win += struct.pack("<II", 0, 16)  # LoaderFlags, NumberOfRvaAndSizes
    win += b"\0" * (16 * 8)  # data directories: none used
    optional = std + win
    assert len(optional) == opt_size, (len(optional), opt_size)

    # .text: CNT_CODE | MEM_EXECUTE | MEM_READ
    section = struct.pack(
        "<8sIIIIIIHHI", b".text", len(text), text_rva, len(text_raw), size_of_headers, 0, 0, 0, 0, 0x60000020
    )
    headers = _dos_header_and_stub() + b"PE\0\0" + coff + optional + section
    headers += b"\0" * (size_of_headers - len(headers))
    return headers + text_raw


def pe_machine(data: bytes) -> str | None:
    """The architecture of a PE image (``x86_64``/``i386``), or None if it is not one."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    off = struct.unpack_from("<I", data, 0x3C)[0]
    if data[off : off + 4] != b"PE\0\0":
        return None
    machine = struct.unpack_from("<H", data, off + 4)[0]
    return next((a for a, (m, _) in MACHINES.items() if m == machine), None)
