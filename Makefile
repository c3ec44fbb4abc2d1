# cowfs: set up, test, lint and demo. README.md says which target to use when.
#
# Every target depends on `setup`, which is incremental: the Debian packages are checked with
# dpkg on each run (cheap) and installed only when missing; the virtualenv is rebuilt only when
# pyproject.toml is newer than its stamp file.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.cowfs-installed
#: cowfs alone in the venv (make install), without the test and lint tools.
TOOL_STAMP := $(VENV)/.cowfs-tool-installed
PYTEST_ARGS ?=

# fuse3/libfuse3-dev/pkg-config/patch: building (with patches/pyfuse3/) and running pyfuse3; it
# compiles from source, so also a C compiler (gcc, libc6-dev) and the Python headers (python3-dev:
# those of Debian's python3; another PYTHON must bring its own).
# attr: getfattr/setfattr, used by the tests and the demo to show the layer format.
# fuse-overlayfs: behaviour reference in tests.
# The filesystems layers live on, which the tests make themselves (tests/fs_support.py):
# xfsprogs/btrfs-progs (uppers on XFS with reflinks and on Btrfs), squashfs-tools/squashfuse and
# erofs-utils (read-only image lowers), sshfs/openssh-server/openssh-client (a lower on sshfs over
# a loopback sshd the test starts; where an init system runs, installing openssh-server also
# starts the system's sshd, which the tests do not use).
# jq: the docs' walkthroughs read JSON output with it (tests/test_docs.py runs them).
# skopeo: a real OCI tool to check `cowfs image export`'s output with, and to convert images for
# `cowfs image import` (tests/test_tools_image.py: local oci: and docker-archive: only, no network).
# TOOL_APT_PACKAGES are what the tool itself needs (`make install`); the rest only the tests.
TOOL_APT_PACKAGES := fuse3 libfuse3-dev pkg-config patch gcc libc6-dev python3-dev attr
APT_PACKAGES := $(TOOL_APT_PACKAGES) fuse-overlayfs \
                xfsprogs btrfs-progs squashfs-tools squashfuse erofs-utils \
                sshfs openssh-server openssh-client skopeo jq

# mount(8) runs /sbin/mount.<type> for `mount -t fuse.cowfs`; on Debian /sbin is /usr/sbin.
MOUNT_HELPER := /usr/sbin/mount.fuse.cowfs
MOUNT_HELPER_TARGET := $(CURDIR)/$(VENV)/bin/mount.fuse.cowfs

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help install setup tool-packages system-packages helper shell-install test test-user lint \
        check demo clean

help:
	@echo 'make demo    set up, then mount a small demo overlay under /tmp and show copy-up'
	@echo 'make test    set up, install the mount helper (root), run the tests (PYTEST_ARGS=...)'
	@echo 'make test-user   the mount tests again as uid 65534 (root sets it up; make test runs it)'
	@echo 'make coverage    the tests with the coverage of the daemons too (a report; slower)'
	@echo 'make lint    ruff check cowfs tests bench; mypy cowfs'
	@echo 'make check   lint + test'
	@echo 'make install the tool alone: its Debian packages + .venv with cowfs (what demo uses)'
	@echo 'make setup   install + the packages and Python tools of the tests and lint'
	@echo 'make helper  symlink $(MOUNT_HELPER) to this checkout (development; root)'
	@echo 'make system-install  cowfs for all users, without the checkout: $(PREFIX)/lib/cowfs,'
	@echo '             $(PREFIX)/bin/cowfs, $(MOUNT_HELPER) (root; PREFIX=..., SBINDIR=...)'
	@echo 'make system-uninstall  remove what system-install installed'
	@echo 'make shell-install  link the completion and man page into /usr/local/share (root)'
	@echo 'make docker-test  build the container image and smoke-test it (own Docker engine)'
	@echo 'make docker-load-test  docker load of cowfs image export output (a Docker engine)'
	@echo 'make bench   compare cowfs with native, overlayfs, fuse-overlayfs, and a large tree (root; BENCH_MODE=full)'
	@echo 'make bench-full   the same, larger and with more repetitions, 1,000,000 files (about an hour)'
	@echo 'make faults  the full fault-injection enumeration (tests/test_faults.py, long)'
	@echo 'make clean   remove .venv and caches'

# Shell completion (bash, zsh) and the man page, generated from cowfs's argument parser into the
# venv: `man cowfs` finds .venv/share/man by itself when .venv/bin is on PATH; for completion,
# `source .venv/share/bash-completion/completions/cowfs` (bash) or add .venv/share/zsh/site-functions
# to fpath (zsh), or run `make shell-install` as root for every shell of the machine.
SHARE := $(VENV)/share
SHELL_FILES := $(SHARE)/bash-completion/completions/cowfs $(SHARE)/zsh/site-functions/_cowfs \
               $(SHARE)/man/man1/cowfs.1
setup: system-packages $(STAMP) $(SHELL_FILES)

$(SHELL_FILES) &: $(STAMP) scripts/shell-files.sh cowfs/cli.py cowfs/tools/commands.py docs/cli.md
	bash scripts/shell-files.sh $(VENV)/bin/python $(SHARE)

# Symlinks in /usr/local/share (searched by bash-completion, Debian's zsh and man) to the files
# in the venv; like `make helper`, root only, and left alone when something else is there.
SYSTEM_SHARE := /usr/local/share
shell-install: setup
	@if [[ "$$(id -u)" -ne 0 ]]; then echo "shell-install: needs root"; exit 1; fi
	@for rel in bash-completion/completions/cowfs zsh/site-functions/_cowfs man/man1/cowfs.1; do \
	    target=$(SYSTEM_SHARE)/$$rel; mkdir -p "$$(dirname "$$target")"; \
	    if [[ -e "$$target" && ! -L "$$target" ]]; then \
	        echo "$$target exists and is not a symlink; leaving it alone."; \
	    else ln -sfn $(CURDIR)/$(SHARE)/$$rel "$$target"; echo "linked $$target"; fi; \
	done

# Installs the Debian packages of $(1) that are missing, in one apt-get call.
define apt_install
	@if ! command -v dpkg >/dev/null; then \
	    echo "Not a Debian system: install the equivalents of: $(1)"; exit 0; \
	fi; \
	missing=""; \
	for pkg in $(1); do \
	    [[ "$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
	        || missing="$$missing $$pkg"; \
	done; \
	if [[ -n "$$missing" ]]; then \
	    echo "Installing Debian packages:$$missing"; \
	    $(SUDO) apt-get update; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi
endef

tool-packages:
	$(call apt_install,$(TOOL_APT_PACKAGES))

system-packages:
	$(call apt_install,$(APT_PACKAGES))

# The tool alone, for who only wants to use it (make demo, make helper): no pytest, mypy, ruff.
install: tool-packages $(TOOL_STAMP)

# Order-only on tool-packages: pyfuse3 compiles against libfuse3-dev, but a package check
# must not by itself force a reinstall of the venv.
$(TOOL_STAMP): pyproject.toml scripts/build-pyfuse3.sh $(wildcard patches/pyfuse3/*.patch) | tool-packages
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	    echo "cowfs needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." \
	         "Pass another: make PYTHON=python3.12 ..."; exit 1; }
	@# A venv whose interpreter no longer runs (its base Python was removed) is rebuilt whole.
	@if [[ -d $(VENV) ]] && ! $(VENV)/bin/python -c '' 2>/dev/null; then rm -rf $(VENV); fi
	@if [[ ! -x $(VENV)/bin/python ]]; then \
	    echo "Creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); fi
	@# pyfuse3 first, built from its pinned source with our patches (patches/pyfuse3/README.md),
	@# so that installing cowfs finds it satisfied.
	bash scripts/build-pyfuse3.sh $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --disable-pip-version-check --no-input -e .
	@touch $@

# The tests' and lint's Python tools on top (pyproject.toml's [test] extra).
$(STAMP): $(TOOL_STAMP) | system-packages
	$(VENV)/bin/python -m pip install --disable-pip-version-check --no-input -e '.[test]'
	@touch $@

# The development form of the mount helper: /usr/sbin/mount.fuse.cowfs runs THIS checkout's .venv
# (editable: the code of this work tree), which the tests need (they mount the checkout under
# test). For users, system-install below.
helper: install
	@if [[ "$$(id -u)" -ne 0 ]]; then \
	    echo "Not root: mount -t fuse.cowfs needs the mount helper; to install it run:"; \
	    echo "  sudo ln -sfn $(MOUNT_HELPER_TARGET) $(MOUNT_HELPER)"; \
	elif [[ -e $(MOUNT_HELPER) && ! -L $(MOUNT_HELPER) ]]; then \
	    echo "$(MOUNT_HELPER) exists and is not a symlink; leaving it alone."; \
	elif [[ "$$(readlink $(MOUNT_HELPER) || true)" != "$(MOUNT_HELPER_TARGET)" ]]; then \
	    ln -sfn $(MOUNT_HELPER_TARGET) $(MOUNT_HELPER); \
	    echo "Installed mount helper: $(MOUNT_HELPER) -> $(MOUNT_HELPER_TARGET)"; \
	fi

# cowfs for the users of a machine, independent of any checkout (scripts/system-install.sh): a
# virtualenv of its own in $(PREFIX)/lib/cowfs with cowfs installed (not editable) and pyfuse3
# patched; $(PREFIX)/bin/cowfs, $(SBINDIR)/mount.fuse.cowfs, the man page and the completion
# linked to it. Replaces make helper's and make shell-install's links (the development form);
# system-uninstall removes it. Root for the default PREFIX and SBINDIR.
PREFIX ?= /usr/local
SBINDIR ?= /usr/sbin
.PHONY: system-install system-uninstall
system-install: tool-packages
	bash scripts/system-install.sh install $(PYTHON) $(PREFIX) $(SBINDIR)

system-uninstall:
	bash scripts/system-install.sh uninstall $(PYTHON) $(PREFIX) $(SBINDIR)

# `make test` runs the whole suite as root, measuring the coverage of cowfs in the test process
# ([tool.coverage.run] in pyproject.toml) and failing below COVERAGE_FLOOR, then the mount tests
# again as a plain user (test-user). With PYTEST_ARGS (a targeted run) it runs only the first pass,
# and the floor is not enforced.
# COVERAGE_FLOOR: a few points under the coverage measured by a full run (README, "Development").
COVERAGE_FLOOR ?= 63
# The tests a plain user runs: the mount tests (but not the differential ones, which compare with
# the kernel's overlayfs, which only root can mount: they would all skip), and `cowfs run`'s
# (a plain user's private view is made in a user namespace).
USER_TESTS ?= $(filter-out tests/test_mount_differential.py tests/test_mount_kernel_compat.py \
                             tests/test_mount_datacalls.py,\
                           $(wildcard tests/test_mount_*.py)) tests/test_tools_run.py
COVERAGE_ARGS = --cov --cov-report=term $(if $(PYTEST_ARGS),,--cov-fail-under=$(COVERAGE_FLOOR))

test: setup helper
	@status=0; \
	echo '$(VENV)/bin/python -m pytest $(COVERAGE_ARGS) $(PYTEST_ARGS)'; \
	$(VENV)/bin/python -m pytest $(COVERAGE_ARGS) $(PYTEST_ARGS) || status=$$?; \
	if [[ -z "$(PYTEST_ARGS)" ]]; then $(MAKE) --no-print-directory test-user || status=1; fi; \
	exit $$status

# The mount tests as uid 65534 (issue 9: rootless use); needs root to set up what that user needs
# (scripts/test-as-user.sh says what, and restores it).
# The whole suite with the coverage of the daemons too (slower: every daemon runs traced); a
# report, no floor. PYTEST_ARGS='tests/test_mount_namespace.py' narrows it.
.PHONY: coverage
coverage: setup helper
	$(VENV)/bin/python -m pytest --cov --cov-config=tests/coverage-daemons.toml --cov-report=term \
	    $(PYTEST_ARGS)

# Images too: a plain user exports and imports them (whiteouts as 0/0 devices; the files
# imported are the user's own).
USER_TESTS += tests/test_tools_image.py
# And issue 21's whole job (import, run, freeze, squash, export, the kernel mounting the stack in
# a user namespace of the user's own), as the README says a plain user does it.
USER_TESTS += tests/test_tools_workflow.py

test-user: setup
	@if [[ "$$(id -u)" -ne 0 ]]; then \
	    echo "test-user: not root, so the mount tests as a plain user are not run" \
	         "(they need root to set up /dev/fuse and to drop to uid 65534)"; exit 0; fi; \
	bash scripts/test-as-user.sh $(CURDIR)/$(VENV)/bin/python $(USER_TESTS) $(PYTEST_ARGS)

# Both tools run even when the first fails, so one run shows every finding.
lint: setup
	@status=0; \
	echo '$(VENV)/bin/ruff check cowfs tests bench'; \
	$(VENV)/bin/ruff check cowfs tests bench || status=1; \
	echo '$(VENV)/bin/mypy cowfs'; $(VENV)/bin/mypy cowfs || status=1; \
	exit $$status

check: lint test

demo: install
	bash scripts/demo.sh

# Refuses while anything is mounted inside the work tree: rm -r would descend into it and delete
# the files of the layers behind the mount. find -xdev stays on this filesystem for the same reason.
clean:
	@mounted=$$(awk -v top='$(CURDIR)/' 'index($$2, top) == 1 {print $$2}' /proc/mounts); \
	if [[ -n "$$mounted" ]]; then \
	    echo "Not cleaning: mounted inside the work tree:"; echo "$$mounted"; exit 1; fi
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage .coverage.* build *.egg-info
	find . -xdev -name __pycache__ -type d -prune -exec rm -rf {} +

# --- container image (docker/) -----------------------------------------------------------------
# Builds the image with a private Docker daemon and runs docker/smoke-test.sh in a container. It
# takes a few minutes (debootstrap, apt, pip), so it is not part of `make test`. Needs root and
# the Debian packages docker.io and debootstrap (installed here when missing).
.PHONY: docker-test
docker-test:
	@for pkg in docker.io debootstrap; do \
	    [[ "$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true)" == "install ok installed" ]] \
	        || missing="$${missing:-} $$pkg"; \
	done; \
	if [[ -n "$${missing:-}" ]]; then \
	    $(SUDO) apt-get update; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; fi
	$(SUDO) bash docker/test.sh

# docker load of what cowfs image export writes (tests/test_tools_docker.py, opt-in: it needs a
# Docker engine): the engine DOCKER_HOST or the default socket reaches, else, as root, a private
# dockerd the test starts and stops (no bridge, no iptables, its files in a temporary directory).
# Installs docker.io where dockerd is missing.
.PHONY: docker-load-test
docker-load-test: setup
	@if ! command -v dockerd >/dev/null && ! docker version >/dev/null 2>&1; then \
	    $(SUDO) apt-get update; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io; fi
	COWFS_TEST_DOCKER=1 $(VENV)/bin/python -m pytest tests/test_tools_docker.py $(PYTEST_ARGS)

# --- benchmark (bench/, docs/performance.md) ---------------------------------------------------
# Needs root (mount -t overlay, drop_caches). Installs what cowfs is compared with: fuse-overlayfs
# always, unionfs-fuse where the Debian mirror has it (the benchmark skips targets it lacks).
BENCH_MODE ?= quick
BENCH_ARGS ?=
BENCH_APT_PACKAGES := fuse-overlayfs git tar
.PHONY: bench bench-full bench-packages

bench: setup bench-packages
	$(VENV)/bin/python bench/run.py --mode $(BENCH_MODE) $(BENCH_ARGS)
	PATH=$(VENV)/bin:$$PATH $(VENV)/bin/python bench/copyup_space.py

bench-full:
	$(MAKE) bench BENCH_MODE=full

bench-packages:
	@command -v dpkg >/dev/null || exit 0; \
	installed() { dpkg -s "$$1" 2>/dev/null | grep -q '^Status: install ok installed'; }; \
	missing=""; \
	for pkg in $(BENCH_APT_PACKAGES); do installed "$$pkg" || missing="$$missing $$pkg"; done; \
	if [[ -n "$$missing" ]]; then \
	    echo "Installing Debian packages for the benchmark:$$missing"; \
	    $(SUDO) apt-get update; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi; \
	if ! installed unionfs-fuse; then \
	    if apt-cache show unionfs-fuse >/dev/null 2>&1; then \
	        $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y unionfs-fuse; \
	    else echo "unionfs-fuse is not available here; the benchmark leaves it out"; fi; \
	fi

# --- conformance -------------------------------------------------------------------------------
# The random operation sequences against the kernel's overlayfs (tests/test_conformance_stateful.py)
# run far longer than in `make test`: profile "long" (thousands of examples, each failure shrunk to
# a minimal sequence: paste it into tests/test_conformance_regressions.py). CONFORMANCE_PROFILE=
# explore stops at the first failure without shrinking it. PYTEST_ARGS='-x' etc. pass to pytest.
.PHONY: conformance
CONFORMANCE_PROFILE ?= long
conformance: setup helper
	HYPOTHESIS_PROFILE=$(CONFORMANCE_PROFILE) $(VENV)/bin/python -m pytest \
	    -o faulthandler_timeout=0 \
	    tests/test_conformance_stateful.py tests/test_conformance_regressions.py $(PYTEST_ARGS)

# --- fault injection -----------------------------------------------------------------------------
# tests/test_faults.py in full: every situation, every injection point, every action (kill-before,
# kill-after, ENOSPC, EIO, EACCES, EDQUOT): about 3,000 cases, hours on two cores (PYTEST_ARGS=
# '-k kill-before' selects a part). `make test` runs a smoke subset. The counts are printed at
# the end. PYTEST_ARGS='-x' etc. pass to pytest.
.PHONY: faults
faults: setup helper
	$(VENV)/bin/python -m pytest -m '' -o faulthandler_timeout=0 tests/test_faults.py $(PYTEST_ARGS)
