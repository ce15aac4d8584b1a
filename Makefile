# nftdivert: everything a fresh Debian/Ubuntu machine needs, as root.
#   make test         the test suite (installs what it needs first)
#   make demo         the origin scenario in a throwaway lab
#   make test-kernel  the end-to-end suite on a stock distribution kernel (VM, native nft queue)
#   make bench        diverted vs. kernel-only throughput, side by side

PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
# System packages: libnftables and its Python bindings come from the
# distribution (they must match each other); NetfilterQueue builds against
# libnetfilter-queue; the rest are the tools the tests drive.
APT_PACKAGES := nftables python3-nftables iptables libnetfilter-queue-dev \
	python3-venv python3-dev build-essential iproute2 util-linux \
	netcat-openbsd curl tcpdump conntrack bind9-dnsutils
PYTEST_ARGS ?=

.PHONY: all deps venv test test-kernel demo bench render clean

all: venv

deps: .cache/apt.stamp
.cache/apt.stamp:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p .cache && touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: .cache/apt.stamp setup.cfg pyproject.toml
	$(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c 'import nftables, netfilterqueue'
	@touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The same end-to-end and engine tests on a stock distribution kernel, whose
# native nft queue statement this machine's kernel may lack: booted under
# qemu (software emulation) by virtme-ng with this root file system read-only.
# The kernel package is cached in .cache/kernel.
KERNEL_TESTS ?= tests/e2e/test_e2e.py tests/e2e/test_e2e_faults.py tests/e2e/test_e2e_load.py tests/e2e/test_e2e_identity.py tests/test_runner.py tests/ruleset/test_engine.py tests/ruleset/test_render.py
test-kernel: venv
	$(PY) tests/vm/vmrun --ensure
	@# A failure inside the VM must fail the tier: prove vmrun passes it on.
	@if $(PY) tests/vm/vmrun --timeout 300 -- false >/dev/null 2>&1; then \
		echo "vmrun reported success for a failing command" >&2; exit 1; fi
	$(PY) tests/vm/vmrun --timeout 900 --env NFTDIVERT_TEST_BACKEND=nft -- \
		python -m pytest -p no:cacheprovider -ra -m "not slow" $(KERNEL_TESTS)

# The origin scenario, in a throwaway lab: a client connects to an arbitrary
# address and port and gets an answer; the log shows the original destination.
demo: venv
	$(VENV)/bin/nftdivert sandbox --log-format text -- sh -c \
		'echo "hello, 198.51.100.7" | nc -v -q1 -w5 198.51.100.7 45678 && curl -sS --max-time 10 http://anything.example:8080/'

# Diverted vs. kernel-only, side by side in one run; numbers also in bench-results.json.
BENCH_ARGS ?=
bench: venv
	$(PY) bench/divert_bench.py $(BENCH_ARGS)

render: venv
	@$(VENV)/bin/nftdivert render

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
