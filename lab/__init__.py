"""hyper2kvm validation lab: boot disks under QEMU, observe, score; and the test bed."""
