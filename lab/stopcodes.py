"""Windows bugcheck (stop) codes -> names.

Names follow Microsoft's "Bug check code reference" (learn.microsoft.com,
windows-driver-docs "bug-check-code-reference2"). The table holds the codes a
migration lab meets in practice (storage, drivers, boot, hardware, watchdogs).
Codes with the 0x10000000 bit set are the "_M" variants of the same bugcheck
(e.g. 0x1000007E SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M).
"""

from __future__ import annotations

STOP_CODES: dict[int, str] = {
    0x0000000A: "IRQL_NOT_LESS_OR_EQUAL",
    0x00000019: "BAD_POOL_HEADER",
    0x0000001A: "MEMORY_MANAGEMENT",
    0x0000001E: "KMODE_EXCEPTION_NOT_HANDLED",
    0x00000023: "FAT_FILE_SYSTEM",
    0x00000024: "NTFS_FILE_SYSTEM",
    0x0000002E: "DATA_BUS_ERROR",
    0x00000035: "NO_MORE_IRP_STACK_LOCATIONS",
    0x0000003B: "SYSTEM_SERVICE_EXCEPTION",
    0x0000003F: "NO_MORE_SYSTEM_PTES",
    0x0000004E: "PFN_LIST_CORRUPT",
    0x00000050: "PAGE_FAULT_IN_NONPAGED_AREA",
    0x0000005C: "HAL_INITIALIZATION_FAILED",
    0x00000067: "CONFIG_INITIALIZATION_FAILED",
    0x00000069: "IO1_INITIALIZATION_FAILED",
    0x0000006B: "PROCESS1_INITIALIZATION_FAILED",
    0x00000074: "BAD_SYSTEM_CONFIG_INFO",
    0x00000077: "KERNEL_STACK_INPAGE_ERROR",
    0x00000078: "PHASE0_EXCEPTION",
    0x0000007A: "KERNEL_DATA_INPAGE_ERROR",
    0x0000007B: "INACCESSIBLE_BOOT_DEVICE",
    0x0000007C: "BUGCODE_NDIS_DRIVER",
    0x0000007E: "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED",
    0x0000007F: "UNEXPECTED_KERNEL_MODE_TRAP",
    0x0000008E: "KERNEL_MODE_EXCEPTION_NOT_HANDLED",
    0x0000009C: "MACHINE_CHECK_EXCEPTION",
    0x0000009F: "DRIVER_POWER_STATE_FAILURE",
    0x000000A0: "INTERNAL_POWER_ERROR",
    0x000000A5: "ACPI_BIOS_ERROR",
    0x000000BE: "ATTEMPTED_WRITE_TO_READONLY_MEMORY",
    0x000000C1: "SPECIAL_POOL_DETECTED_MEMORY_CORRUPTION",
    0x000000C2: "BAD_POOL_CALLER",
    0x000000C4: "DRIVER_VERIFIER_DETECTED_VIOLATION",
    0x000000C5: "DRIVER_CORRUPTED_EXPOOL",
    0x000000CA: "PNP_DETECTED_FATAL_ERROR",
    0x000000D1: "DRIVER_IRQL_NOT_LESS_OR_EQUAL",
    0x000000D5: "DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL",
    0x000000E2: "MANUALLY_INITIATED_CRASH",
    0x000000EA: "THREAD_STUCK_IN_DEVICE_DRIVER",
    0x000000ED: "UNMOUNTABLE_BOOT_VOLUME",
    0x000000EF: "CRITICAL_PROCESS_DIED",
    0x000000F4: "CRITICAL_OBJECT_TERMINATION",
    0x000000F7: "DRIVER_OVERRAN_STACK_BUFFER",
    0x000000FC: "ATTEMPTED_EXECUTE_OF_NOEXECUTE_MEMORY",
    0x00000101: "CLOCK_WATCHDOG_TIMEOUT",
    0x00000109: "CRITICAL_STRUCTURE_CORRUPTION",
    0x00000116: "VIDEO_TDR_FAILURE",
    0x00000119: "VIDEO_SCHEDULER_INTERNAL_ERROR",
    0x00000124: "WHEA_UNCORRECTABLE_ERROR",
    0x0000012B: "FAULTY_HARDWARE_CORRUPTED_PAGE",
    0x00000133: "DPC_WATCHDOG_VIOLATION",
    0x00000139: "KERNEL_SECURITY_CHECK_FAILURE",
    0x0000013A: "KERNEL_MODE_HEAP_CORRUPTION",
    0x00000144: "BUGCODE_USB3_DRIVER",
    0x00000154: "UNEXPECTED_STORE_EXCEPTION",
    0xC0000218: "STATUS_CANNOT_LOAD_REGISTRY_FILE",
    0xC000021A: "WINLOGON_FATAL_ERROR",
    0xC0000221: "STATUS_IMAGE_CHECKSUM_MISMATCH",
    0xDEADDEAD: "MANUALLY_INITIATED_CRASH1",
}

# Short hints for the codes a VM migration causes; shown in reasons.
HINTS: dict[int, str] = {
    0x7B: "no boot-start driver for the boot disk's controller",
    0xED: "the boot volume could not be mounted",
    0x7E: "a driver crashed in a system thread",
    0xC000021A: "a critical user-mode process (winlogon/csrss) ended",
}

_M_BIT = 0x10000000


def normalize(code: int) -> int:
    """Stop codes arrive as unsigned 64-bit values in QMP; keep the low 32 bits."""
    return int(code) & 0xFFFFFFFF


def name_of(code: int) -> str | None:
    """The bugcheck's symbolic name, or None if unknown."""
    code = normalize(code)
    if code in STOP_CODES:
        return STOP_CODES[code]
    # The "_M" variants: same meaning, different parameter layout.
    if code & 0xF0000000 == _M_BIT and (code & ~_M_BIT) in STOP_CODES:
        return STOP_CODES[code & ~_M_BIT] + "_M"
    return None


def describe(code: int) -> str:
    """'0x0000007B INACCESSIBLE_BOOT_DEVICE' (or just the hex for unknown codes)."""
    code = normalize(code)
    name = name_of(code)
    text = f"0x{code:08X}"
    return f"{text} {name}" if name else text


def hint(code: int) -> str | None:
    code = normalize(code)
    return HINTS.get(code) or HINTS.get(code & ~_M_BIT)
