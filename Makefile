# Two commands for a new user: `make demo` and `make test`. Each sets up everything it
# needs on a fresh Debian 12 machine (as root), is idempotent, and caches what it built.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KABUTO := $(VENV)/bin/kabuto
# containernetworking-plugins: CNI's bridge and host-local, which tests/unit/test_network_cni.py runs;
# the last line builds the small guest kernel (src/kabuto/image/kernel.py)
APT_PACKAGES := qemu-system-x86 qemu-utils busybox-static containerd runc podman conmon iproute2 cpio zstd \
	e2fsprogs python3-venv containernetworking-plugins \
	make gcc libc6-dev flex bison bc xz-utils libelf-dev libssl-dev
STAMP := $(VENV)/.installed

.PHONY: demo test bench soak lint image deps clean apt

# containerd looks for containerd-shim-kabuto-v2 on its PATH (runtime io.containerd.kabuto.v2)
SHIM_LINK := /usr/local/bin/containerd-shim-kabuto-v2

deps: $(STAMP)
	@ln -sfn $(abspath $(VENV))/bin/containerd-shim-kabuto-v2 $(SHIM_LINK)

# apt-get only runs when a package is missing, so repeated runs stay fast and offline.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory apt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

image: deps
	$(KABUTO) image build

demo: deps image
	$(KABUTO) hypervisors
	$(KABUTO) vm boot
	@echo "host  kernel release: $$(uname -r)"
	@echo "guest kernel release: $$($(KABUTO) run --busybox -- uname -r)"

test: deps image
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q -ra

bench: deps image
	$(PY) -m kabuto.bench

# the reliability suite's long versions (SOAK_CYCLES leak cycles per entry, 300 unless given as
# `make soak SOAK_CYCLES=N`; more hypothesis examples, bigger floods); its figures go into
# docs/reliability.md
SOAK_FIGURES := build/reliability-figures.json
SOAK_CYCLES ?= 300
soak: deps image
	@rm -f $(SOAK_FIGURES)
	KABUTO_SOAK=1 KABUTO_SOAK_CYCLES=$(SOAK_CYCLES) KABUTO_FIGURES=$(abspath $(SOAK_FIGURES)) \
		$(PY) -m pytest -q -ra -p no:cacheprovider \
		-o timeout=0 tests/reliability
	$(PY) tests/reliability/report.py $(SOAK_FIGURES) docs/reliability.md

lint: deps
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
