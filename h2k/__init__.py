"""hyper2kvm engine: inspect, plan, fix and verify VM disks for KVM/VirtIO."""

__version__ = "0.1.0"
