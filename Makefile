# spendgate developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install litellm-venv run test lint schemas bench clean kafka test-kafka chromium screenshots

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install spendgate with its dev tools (only when needed)

# A real LiteLLM proxy (pinned, deploy/litellm/requirements.txt) for the e2e test and the bench,
# in its own venv: ~520 MB that stay out of spendgate's. spendgate goes in with --no-deps, as a
# gateway installs it (the client and the callback need only httpx). Rebuilt when the pins change.
LITELLM_VENV  := .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed
$(LITELLM_STAMP): deploy/litellm/requirements.txt
	rm -rf $(LITELLM_VENV)
	$(PYTHON) -m venv $(LITELLM_VENV)
	@start=$$(date +%s); \
	$(LITELLM_VENV)/bin/python -m pip install -q --no-deps -r deploy/litellm/requirements.txt && \
	$(LITELLM_VENV)/bin/python -m pip install -q --no-deps -e . && \
	echo "litellm-venv: installed in $$(( $$(date +%s) - start )) s"
	touch $@

litellm-venv: $(LITELLM_STAMP) ## The LiteLLM proxy's own venv (.venv-litellm/) for the e2e test and bench

run: install ## Start the embedded stack: broker, Postgres, worker, API (Ctrl-C stops it)
	$(BIN)/spendgate dev

# The dashboard's browser tests (tests/e2e/test_dashboard_browser.py) drive Debian's Chromium
# through Playwright (PyPI, dev extras); Playwright never downloads a browser. Installed from
# Debian only when missing (as root, or with sudo), each apt-get bounded.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@echo "installing Debian's chromium for the browser tests"
	@SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); export DEBIAN_FRONTEND=noninteractive; \
	timeout 600 $$SUDO apt-get install -y -q chromium || \
	{ timeout 300 $$SUDO apt-get update -q && timeout 600 $$SUDO apt-get install -y -q chromium; }

chromium: $(CHROMIUM) ## Debian's Chromium for the dashboard's browser tests (only when missing)

test: install $(LITELLM_STAMP) $(CHROMIUM) ## Run the whole test suite (starts its own broker, Postgres, LiteLLM proxy, Chromium)
	$(BIN)/pytest -q

screenshots: install $(CHROMIUM) ## Re-take the dashboard screenshots and 100k timings in docs/ (the browser test)
	SPENDGATE_SCREENSHOTS_DIR=docs $(BIN)/pytest -q tests/e2e/test_dashboard_browser.py

kafka: install ## Real Apache Kafka (3 KRaft brokers, fetched with Maven once) until Ctrl-C
	$(BIN)/python -m spendgate.adapters.kafka_cluster up

# The e2e tests that start their own embedded stack (dev CLI, README quick start) would not
# touch the cluster: only the one that honours SPENDGATE_TEST_KAFKA_BOOTSTRAP runs here.
# Tests marked broker_agnostic (Postgres or HTTP validation only, or their own embedded broker;
# pyproject.toml) add nothing on a real broker and run in `make test` only.
# PYTEST_ARGS: more pytest options, e.g. PYTEST_ARGS=--basetemp=/tmp/kafka-run1 keeps the workers' logs.
test-kafka: install $(LITELLM_STAMP) ## Integration + e2e on a real 3-broker Kafka (RF 3, min ISR 2), broker failures
	$(BIN)/python -m spendgate.adapters.kafka_cluster test -- -q -rf -p no:cacheprovider --durations=15 \
		$(PYTEST_ARGS) -m "not broker_agnostic" tests/integration tests/e2e/test_litellm_proxy.py

lint: install ## ruff + mypy
	$(BIN)/ruff check services tests
	$(BIN)/mypy services/

schemas: install ## Regenerate the JSON Schemas in schemas/
	$(BIN)/spendgate schemas schemas

# BENCH_ARGS: e.g. BENCH_ARGS="--kafka real" (gate + worker on 3 real Kafka brokers), "--only gate --quick".
bench: install $(LITELLM_STAMP) ## Benchmarks: gate, worker, enforcement delay, overshoot, cold start -> BENCHMARKS.md/.json
	@($(BIN)/python -c 'import redis' 2>/dev/null && test -x $(BIN)/py-spy) || $(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

clean: ## Remove caches, build output and the dev stack's data (.spendgate/)
	rm -rf .spendgate .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
	find services -name '*.egg-info' -type d -prune -exec rm -rf {} +
