# Every target creates the virtualenv itself, so each works on a fresh clone.
# The virtualenv's interpreter (tools/venv-python: the distribution's own
# CPython when it is 3.11 or newer, the faster build; else python3).
PYTHON ?= $(shell tools/venv-python)
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/config.toml

.PHONY: run test typecheck soak fuzz bench venv sysdeps benchdeps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install when the packaging changes.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# System tools the tests drive: curl and openssl (end-to-end), git (a clone
# through the proxy, with git http-backend as origin), groff (man page lint).
sysdeps:
	@command -v curl >/dev/null && command -v openssl >/dev/null && command -v groff >/dev/null && \
	  command -v git >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl openssl groff-base git; }

run: venv
	$(BIN)/twistd -n codexproxy --config $(CONFIG)

# Static types: mypy with the mypy-zope plugin (settings in setup.cfg), zero errors.
typecheck: venv
	$(BIN)/mypy codex_proxy

test: typecheck sysdeps
	$(BIN)/python -m pytest -q tests

# The long load tests of issue 9 (20,000 connections, 50,000 requests,
# 2,000 tunnels across 20 reloads); `make test` runs short versions.
soak: venv sysdeps
	CODEX_SOAK=1 $(BIN)/python -m pytest -q tests/e2e/test_soak.py tests/e2e/test_shutdown.py

# Hypothesis on the HTTP head parser, chunked reader and SOCKS5 parsers,
# in rounds of 20,000 examples per test, each round a fresh random seed,
# for FUZZ_SECONDS (10 minutes); `make test` runs a few hundred per test.
FUZZ_SECONDS ?= 600
FUZZ_TESTS := tests/test_httphead.py tests/test_socks5wire.py -k "fuzz or random or round_trip"
fuzz: venv
	@end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); rounds=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	  rounds=$$((rounds + 1)); \
	  CODEX_FUZZ=1 $(BIN)/python -m pytest -q --hypothesis-show-statistics $(FUZZ_TESTS) \
	    > .fuzz-round.log 2>&1 || { cat .fuzz-round.log; exit 1; }; \
	  grep -o '[0-9]* passing,' .fuzz-round.log | awk '{n += $$1} END {print n}' >> .fuzz-counts; \
	done; \
	echo "fuzz: $$rounds rounds, $$(awk '{n += $$1} END {print n}' .fuzz-counts) examples passed, no failure"; \
	rm -f .fuzz-round.log .fuzz-counts

# Load tools for the benchmark; PEERS="squid tinyproxy" adds those proxies.
benchdeps:
	@command -v wrk >/dev/null && test -x /usr/sbin/nginx && command -v gcc >/dev/null && \
	  $(foreach p,$(PEERS),command -v $(p) >/dev/null || test -x /usr/sbin/$(p) &&) true || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    wrk nginx-light gcc util-linux $(PEERS); }

# QUICK=1: one short round (under 2 minutes). BASELINE=DIR: also measure the
# checkout in DIR (a git worktree of an earlier commit) as "before", in the
# same rounds. bench/rss_tunnel.py and the other bench/*.py scripts measure
# single properties on their own.
bench: venv sysdeps benchdeps
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(if $(PEERS),--peers "$(PEERS)") $(if $(BASELINE),--baseline "$(BASELINE)")

clean:
	rm -rf $(VENV) build *.egg-info .hypothesis .mypy_cache .fuzz-round.log .fuzz-counts
