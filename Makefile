# Each target installs what it needs into .venv by itself, so a fresh clone needs only python3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test test-tansu unit lint typecheck demo broker clean fmt bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

test: venv
	$(BIN)/python -m pytest -p no:cacheprovider

# Everything that does not need Apache Kafka semantics, on the Python-only Tansu broker.
test-tansu: venv
	ESCALATOR_BROKER=tansu $(BIN)/python -m pytest -p no:cacheprovider -m "not real_kafka"

unit: venv
	$(BIN)/python -m pytest -m unit -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv
	$(BIN)/mypy schemas services/upgrade_manager/domain services/vnfm_adapter/domain.py services/node_agent/domain.py services/cloud_manager/domain.py

broker: venv
	$(BIN)/escalator broker

demo: venv
	$(BIN)/escalator demo

# Benchmarks, not tests: a markdown table on stdout, JSON in bench/results/latest.json.
# `make bench BENCH_ARGS="--sections overhead --quick"` passes flags to `python -m bench`.
bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .hypothesis
