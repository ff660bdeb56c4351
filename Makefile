# Each target installs what it needs into .venv by itself, so a fresh clone needs only python3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: venv test test-all test-tansu unit lint typecheck demo broker clean fmt bench chaos

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

# What CI runs (.ci/run): everything but the tests marked slow, within the 15-minute budget.
# The unit tests are CPU-bound and independent, so they run on every core (pytest-xdist); the
# integration tests run one at a time, since their timings assume a machine they do not share.
UNIT_WORKERS ?= auto
test: venv
	$(BIN)/python -m pytest -p no:cacheprovider -m "unit and not slow" -n $(UNIT_WORKERS)
	$(BIN)/python -m pytest -p no:cacheprovider -m "not unit and not slow"

# Everything, slow tests included (the input flood, SASL/TLS brokers, every restart point).
test-all: venv
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

# Chaos suite (issue 6): N seeded campaigns (default 20) on the launcher's broker, services
# SIGKILLed and restarted at random moments. Prints the pass table, writes .cache/chaos/*.json,
# exits non-zero on any broken invariant. `make chaos N=50`; ESCALATOR_CHAOS_FIRST_SEED=21 too.
chaos: venv
	ESCALATOR_CHAOS_RUNS=$(or $(N),20) $(BIN)/python -m pytest -p no:cacheprovider tests/chaos -m slow -q

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .hypothesis
