# udpreach: `make demo` and `make test` each set themselves up from a clean clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The machine's own Python (Debian 12's is 3.11.2: older than 3.11.4, where `except*`
# changed). `make test` runs the suite on it too (all but the tests marked once), in a venv of
# its own, when it is another Python than $(PY); tests/test_pty_errors.py runs the CLI's error
# paths on it in either pass.
SYS_PY    ?= /usr/bin/python3
SYS_VENV  := .venv-sys
SYS_STAMP := $(SYS_VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test test-default test-system lint bench bench-deps clean lab-deps test-deps venv-for-py

# .venv belongs to the Python that made it ($(VENV)/.python names it): another PY (`make demo
# PY=/usr/bin/python3`) makes it anew, rather than going on with the old one without a word.
PY_ID   := $(shell $(PY) -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>/dev/null)
VENV_ID := $(shell cat $(VENV)/.python 2>/dev/null)
ifneq ($(PY_ID),)
ifneq ($(PY_ID),$(VENV_ID))
$(STAMP): venv-for-py
endif
endif

$(STAMP): pyproject.toml Makefile
	@if [ -n "$(PY_ID)" ] && [ -e $(VENV) ] && [ "$$(cat $(VENV)/.python 2>/dev/null)" != "$(PY_ID)" ]; then \
	  echo "$(VENV) was not made with $(PY) ($(PY_ID)): making it anew"; rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	echo "$(PY_ID)" > $(VENV)/.python
	touch $(STAMP)

venv-for-py:

$(SYS_STAMP): pyproject.toml Makefile
	test -x $(SYS_VENV)/bin/python || $(SYS_PY) -m venv $(SYS_VENV)
	$(SYS_VENV)/bin/python -m pip install -q --upgrade pip
	$(SYS_VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(SYS_STAMP)

# As root (as in CI), each target installs the system packages it needs and says so in one
# line: `make demo` the real-firewall lab's (nftables, iproute2); `make test` those and chromium
# for the HTML report's browser tests. Not root: nothing is installed, and the demo runs over
# loopback and those tests skip.
# $(call apt_missing,COMMAND:PACKAGE ...,what they are for,what happens without them)
apt_missing = \
	if [ "$$(id -u)" != "0" ]; then echo "not root: nothing installed; $(3)"; exit 0; fi; \
	missing=""; \
	for need in $(1); do \
	  command -v "$${need%%:*}" >/dev/null 2>&1 || missing="$$missing $${need\#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get) for $(2)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "warning: could not install$$missing; $(3)"; \
	fi

lab-deps:
	@$(call apt_missing,nft:nftables ip:iproute2,the real-firewall lab,the demo runs over loopback and the lab tests skip)

test-deps: lab-deps
	@$(call apt_missing,chromium:chromium,the HTML report's browser tests,the HTML report's browser tests skip without chromium)

demo: $(STAMP) lab-deps
	$(BIN)/udpreach demo

test: test-default
	@v() { "$$1" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)'; }; \
	if [ ! -x "$(SYS_PY)" ]; then echo "no $(SYS_PY): the suite ran on one Python only"; \
	elif [ "$$(v $(SYS_PY))" = "$$(v $(BIN)/python)" ]; then \
	  echo "$(SYS_PY) is the Python the suite just ran on: once is enough"; \
	else $(MAKE) --no-print-directory test-system; fi

# The suite's long tests mostly wait (ICMP rate limits, timeouts), so as root it runs in 6
# worker processes whatever the core count (pytest-xdist): on a 2-core VM the CPU is then
# busy about 90% of the time, and the first pass took 218-273 s (4 workers: about 80%, and
# 277-296 s). A file stays on one worker except the lab's and the simulated path's, whose
# tests go one by one; the longest start first, in the order tests/conftest.py puts them
# (--dist loadfile --no-loadscope-reorder). As root the loopback probes send raw (no source
# port bound); without root each binds its source ports on 127.0.0.2, and tests side by side
# would take each other's ports, so the suite runs in one process there. TEST_WORKERS=N sets
# the count (0: one process).
TEST_WORKERS ?= $(shell [ "$$(id -u)" = 0 ] && echo 6 || echo 0)
PYTEST_ARGS := -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-default: $(STAMP) test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The second pass leaves out the tests marked once (tests/conftest.py says which: what is the
# same logic on any 3.11, and the long attacks) and runs everything that depends on the
# Python that runs it.
test-system: $(SYS_STAMP) test-deps
	@echo "the suite again on $(SYS_PY) ($$($(SYS_PY) -V 2>&1)), but for the tests marked once"
	$(SYS_VENV)/bin/python -m pytest $(PYTEST_ARGS) -m "not once"

lint: $(STAMP)
	$(BIN)/ruff check udpreach agent probe tests bench
	$(BIN)/ruff format --check udpreach agent probe tests bench
	$(BIN)/mypy

# The bench also compares with hping3 (and a C sendmmsg sender, built with gcc when present).
bench-deps: lab-deps
	@if [ "$$(id -u)" = "0" ] && ! command -v hping3 >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hping3 >/dev/null) \
	    || echo "warning: could not install hping3; its row will be skipped"; \
	fi

bench: $(STAMP) bench-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(SYS_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
