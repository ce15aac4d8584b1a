# nftdivert: everything a fresh Debian/Ubuntu machine needs, as root.
#   make test         the test suite (installs what it needs first)
#   make demo         the origin scenario in a throwaway lab
#   make test-kernel  the end-to-end suite on a stock distribution kernel (VM, native nft queue)
#   make bench        nftdivert's two divert paths vs. the kernel alone, side by side
#   make dist         a wheel and an sdist in dist/, for a gateway without a checkout (docs/install.md)

PYTHON_SYSTEM ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
# System packages: libnftables and its Python bindings come from the
# distribution (they must match each other); NetfilterQueue builds against
# libnetfilter-queue; the rest are the programs the tests and the demo run
# (tests/programs.py maps each program to its package; a test checks this list),
# python3-requests, a client library the answers test runs in the sandbox,
# systemd, whose systemd-analyze checks the unit nftdivert ships, and
# python3-wheel, which the venv's setuptools builds `make dist`'s wheel with,
# and rsyslog-gnutls, the TLS driver of the syslog collector the tests run.
APT_PACKAGES := nftables python3-nftables iptables libnetfilter-queue-dev \
	python3 python3-venv python3-dev build-essential iproute2 util-linux \
	mount coreutils dash grep procps iputils-ping netcat-openbsd curl tcpdump \
	tshark conntrack bind9-dnsutils python3-requests openssl wget openssh-client \
	nmap swaks file bsdutils rdate ntpsec-ntpdate busybox tftp-hpa make systemd \
	python3-wheel rsyslog rsyslog-gnutls
PYTEST_ARGS ?=

.PHONY: all deps venv test test-kernel demo bench render dist wheelhouse clean

all: venv

# Checked again whenever this Makefile changes (a package may have been added).
# Non-interactive: tshark's "may non-root users capture?" question keeps its
# default (no), and nothing waits for a terminal.
deps: .cache/apt.stamp
.cache/apt.stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq $$missing </dev/null >/dev/null; \
	fi
	@mkdir -p .cache && touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml | .cache/apt.stamp
	$(PYTHON_SYSTEM) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c 'import nftables, netfilterqueue'
	@touch $@

# Everything on the queue path, then the end-to-end suites again on the kernel
# path (tests/conftest.py: what only one path does is marked and skipped on the other).
KERNEL_PATH_TESTS ?= tests/e2e tests/lab/test_sandbox.py
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)
	NFTDIVERT_TEST_PATH=kernel $(PY) -m pytest $(PYTEST_ARGS) $(KERNEL_PATH_TESTS)

# What needs a stock distribution kernel (its native nft queue statement,
# which this machine's kernel may lack): the tests marked `vm` (tests/conftest.py
# has the rule: every end-to-end test but the load tests, plus the kernel's
# read-back of native rulesets). Booted under qemu (software emulation) by
# virtme-ng with this root file system read-only; the kernel package is cached
# in .cache/kernel. Only the files that can hold `vm` tests are collected.
# No hypothesis plugin: none of these tests uses it, and loading it takes 40 s
# under emulation.
VM_TEST_FILES = $(sort $(wildcard tests/e2e/test_e2e*.py) $(shell grep -rl --include='test_*.py' 'mark\.vm' tests))
# The kernel path in the VM: the core module, without what only repeats the
# host's proof (left-alone traffic, status, diff, the gateway's own address).
VM_KERNEL_PATH_FILES = tests/e2e/test_e2e.py
VM_KERNEL_PATH_SKIP = not left_alone and not status and not drift and not own_address
VM_TIMEOUT ?= 2700
test-kernel: venv
	$(PY) tests/vm/vmrun --ensure
	@# Collect here first, with bytecode written: the guest finds the test modules
	@# compiled (and rewritten by pytest), which under emulation takes long.
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -p no:cacheprovider -p no:hypothesispytest \
		--collect-only -q -m vm $(VM_TEST_FILES) >/dev/null
	@# A failure inside the VM must fail the tier: a second, small VM proves that
	@# vmrun passes `false` on. Then a third runs the core end-to-end module on
	@# the kernel path (no queue: nothing there depends on the queue backend, but
	@# the stock kernel's NAT and socket lookup do). Both run one after the other
	@# beside the tests' VM (one CPU each), so on two cores they cost little time.
	@side=$$(mktemp -d); \
	( $(PY) tests/vm/vmrun --no-ensure --cpus 1 --timeout 300 -- false >/dev/null 2>&1; echo $$? >$$side/proof; \
	  $(PY) tests/vm/vmrun --no-ensure --cpus 1 --timeout $(VM_TIMEOUT) --env NFTDIVERT_TEST_PATH=kernel -- \
		python -m pytest -p no:cacheprovider -p no:hypothesispytest -v -ra -m 'not slow and not load' \
		-k '$(VM_KERNEL_PATH_SKIP)' --durations=0 $(VM_KERNEL_PATH_FILES) >$$side/kernel-path.log 2>&1; \
		echo $$? >$$side/kernel-path ) & \
	$(PY) tests/vm/vmrun --no-ensure --cpus 1 --timeout $(VM_TIMEOUT) --env NFTDIVERT_TEST_BACKEND=nft -- \
		python -m pytest -p no:cacheprovider -p no:hypothesispytest -v -ra -m vm --durations=0 \
		$(VM_TEST_FILES); rc=$$?; \
	wait; echo "---- the kernel path, in a VM of its own ----"; cat $$side/kernel-path.log; \
	proof=$$(cat $$side/proof); krc=$$(cat $$side/kernel-path); rm -rf $$side; \
	if [ "$$proof" = 0 ]; then echo "vmrun reported success for a failing command" >&2; exit 1; fi; \
	if [ "$$krc" != 0 ]; then echo "the kernel path's VM tier failed (exit $$krc)" >&2; exit 1; fi; \
	exit $$rc

# The origin scenario, in a throwaway lab: a client connects to an arbitrary
# address and port and gets an answer; the log shows the original destination.
demo: venv
	$(VENV)/bin/nftdivert sandbox --log-format text -- sh -c \
		'echo "hello, 198.51.100.7" | nc -v -q1 -w5 198.51.100.7 45678 && curl -sS --max-time 10 http://anything.example:8080/'

# The kernel, the kernel path and the queue path, side by side in one run, several clients at
# once; then the lab row (50 clients on one bridge, 60 s per path); numbers also in bench-results.json.
BENCH_ARGS ?=
bench: venv
	$(PY) bench/divert_bench.py $(BENCH_ARGS)

render: venv
	@$(VENV)/bin/nftdivert render

# The wheel carries the templates (as nftdivert.templates), the systemd unit,
# the example config and docs/install.md; built offline with the setuptools
# the venv already has. A stale build/ would carry modules since deleted into it.
DIST ?= dist
dist: venv
	rm -rf build
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(DIST) .
	$(PY) -c 'import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])' $(DIST) >/dev/null

# The wheel and every Python dependency as wheels (NetfilterQueue built here),
# for a gateway of the same distribution and architecture without the package
# index: pip install --no-index --find-links DIR nftdivert
wheelhouse: dist
	$(PY) -m pip wheel -q -w $(DIST)/wheelhouse $(DIST)/nftdivert-*.whl

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
