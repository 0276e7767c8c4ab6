"""Inputs: what users actually have (VMware, Hyper-V, cloud, raw disks and their metadata).

One module per job: ``formats`` (what a disk file is, VMDK descriptors),
``chain`` (snapshot chains), ``vmx`` / ``ovf`` / ``hyperv`` / ``cloud``
(metadata parsers into :class:`source.SourceMachine`), ``convert``
(qemu-img convert with progress, checks and a checksum) and ``source``
(the single entry point :func:`source.resolve_input` every command calls).
"""

from h2k.inputs.source import ResolvedInput, SourceMachine, resolve_input

__all__ = ["ResolvedInput", "SourceMachine", "resolve_input"]
