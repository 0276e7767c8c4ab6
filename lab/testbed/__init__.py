"""The test bed: phony Windows disks, a fake virtio-win pack, small real Linux guests."""
