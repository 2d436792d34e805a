# Every target creates the virtualenv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/config.toml

.PHONY: run test bench venv sysdeps benchdeps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install when the packaging changes.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# System tools the tests drive: curl and openssl (end-to-end), groff (man page lint).
sysdeps:
	@command -v curl >/dev/null && command -v openssl >/dev/null && command -v groff >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl openssl groff-base; }

run: venv
	$(BIN)/twistd -n codexproxy --config $(CONFIG)

test: venv sysdeps
	$(BIN)/python -m pytest -q tests

# Load tools for the benchmark; PEERS="squid tinyproxy" adds those proxies.
benchdeps:
	@command -v wrk >/dev/null && test -x /usr/sbin/nginx && command -v gcc >/dev/null && \
	  $(foreach p,$(PEERS),command -v $(p) >/dev/null || test -x /usr/sbin/$(p) &&) true || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    wrk nginx-light gcc util-linux $(PEERS); }

# QUICK=1: one short round (under 2 minutes). bench/rss_tunnel.py and the
# other bench/*.py scripts measure single properties on their own.
bench: venv sysdeps benchdeps
	$(BIN)/python -m bench $(if $(QUICK),--quick) $(if $(PEERS),--peers "$(PEERS)")

clean:
	rm -rf $(VENV) build *.egg-info
