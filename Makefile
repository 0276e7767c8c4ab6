# hyper2kvm: `make test` and `make demo` set up everything they need on a
# fresh Debian/Ubuntu machine (system packages, the virtual environment, the
# project), idempotently, then run.
SHELL      := /bin/bash
VENV       ?= .venv
PY         := $(VENV)/bin/python
APT_LIST   := packaging/apt-packages.txt
STAMPS     := .stamps
JOBS       ?= 2
PYTEST_ARGS ?=

.PHONY: setup system venv test test-linux demo bench clean help

help:
	@echo "make test   - install what is needed, build the test bed, then run the whole test suite"
	@echo "make test-linux - only the Linux end-to-end tier (Debian guests fixed and booted; part of make test)"
	@echo "make demo   - install what is needed, then run the end-to-end demo on the test bed"
	@echo "make bench  - run the benchmarks (ratios against baselines measured in the same run)"

# System packages: only missing ones are installed, so a second run is quick.
$(STAMPS)/system: $(APT_LIST)
	@mkdir -p $(STAMPS)
	@pkgs="$$(grep -v '^\s*#' $(APT_LIST) | grep -v '^\s*$$' | tr '\n' ' ')"; \
	missing=""; for p in $$pkgs; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "system packages: all present"; fi
	@touch $@

system: $(STAMPS)/system

# The venv uses Debian's interpreter so the libguestfs/hivex/libvirt bindings are visible.
$(STAMPS)/venv: pyproject.toml $(STAMPS)/system
	@mkdir -p $(STAMPS)
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@$(PY) -c "import guestfs, hivex, libvirt" || { echo "libguestfs/hivex/libvirt bindings not importable from $(PY)"; exit 1; }
	@touch $@

venv: $(STAMPS)/venv

# The lab runs QEMU as this unprivileged system user when it is started as root (lab/confine.py;
# H2K_QEMU_USER names another). Members of kvm may use /dev/kvm where KVM works.
QEMU_USER ?= h2k-qemu
$(STAMPS)/qemu-user: $(STAMPS)/system
	@mkdir -p $(STAMPS)
	@if [ "$$(id -u)" = 0 ] && ! getent passwd $(QEMU_USER) >/dev/null; then \
	  echo "creating the system user $(QEMU_USER) (QEMU runs as it)"; \
	  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $(QEMU_USER) && \
	  if getent group kvm >/dev/null; then usermod -a -G kvm $(QEMU_USER); fi; \
	fi
	@touch $@

setup: venv $(STAMPS)/qemu-user

# `make test`: every tier, the Linux end-to-end one included (marked `linux`: Debian guests,
# their fix inside the libguestfs appliance and real boots); `make test-linux` runs that tier alone.
# In parallel (pytest-xdist; tests that share a built image share a group), showing each
# test and the slowest ones.
TEST_FLAGS := -n $(JOBS) --dist loadgroup --no-loadscope-reorder -v --durations=30 -p no:cacheprovider

# The test bed is built first, $(JOBS) artefacts at once (cached by recipe hash), so no test
# worker waits on another's build lock.
test: setup
	$(VENV)/bin/h2k testbed build --jobs $(JOBS) all
	$(PY) -m pytest $(TEST_FLAGS) $(PYTEST_ARGS)

test-linux: setup
	$(VENV)/bin/h2k testbed build --jobs $(JOBS) linux-rootfs linux-bios linux-uefi
	$(PY) -m pytest $(TEST_FLAGS) -m linux $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/h2k demo

bench: setup
	$(PY) benchmarks/run.py $(BENCH)

clean:
	rm -rf $(STAMPS) .cache build *.egg-info
