# nbgateway: every target creates .venv itself; nothing relies on what was installed by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the browser, Prometheus and PostgreSQL tests drive.
SYSTEM_PACKAGES := chromium prometheus postgresql

.PHONY: install demo test lint type system-deps bench-deps bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the gateway against the built-in fake NationBuilder (no credentials needed).
## `make demo PORT=8081` when 8080 is taken.
PORT ?= 8080
demo: install
	$(BIN)/nbgateway demo --port $(PORT)

## Install the Debian packages the tests need, when missing.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v nginx >/dev/null 2>&1 || missing="$$missing nginx"; \
	command -v caddy >/dev/null 2>&1 || missing="$$missing caddy"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: install
	$(BIN)/ruff format --check nbgateway tests bench scripts
	$(BIN)/ruff check nbgateway tests bench scripts

type: install
	$(BIN)/mypy

## The whole suite: lint, types, unit, functional, browser and Prometheus tests.
test: lint type system-deps
	$(BIN)/python -m pytest

## wrk, the C load generator bench/run.py uses for its throughput sections, when missing.
bench-deps:
	@command -v wrk >/dev/null 2>&1 || { \
		echo "installing: wrk"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends wrk; \
	}
	@command -v valgrind >/dev/null 2>&1 || { \
		echo "installing: valgrind"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends valgrind; \
	}

bench: install bench-deps
	$(BIN)/python bench/run.py
	$(BIN)/python bench/instructions.py
	$(BIN)/python bench/refresh_scale.py
	$(BIN)/python bench/budget.py

## Regenerate docs/cli.md and the settings table of docs/configuration.md.
docs: install
	$(BIN)/python scripts/gen_docs.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
