# Two commands set everything up on a fresh machine with Python 3.11 and no Docker:
#   make demo    run the main job on embedded services
#   make test    lint, type-check and run the whole suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit demo bench bench-consumer bench-bridge bench-compare contract clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,loadtest,test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

demo: $(STAMP)
	$(BIN)/python -m intentflow.loadtest.demo

# The bridge's part drives it with wrk, a real HTTP load generator (Debian: apt-get).
WRK := command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

bench: $(STAMP)
	$(WRK)
	$(BIN)/python -m intentflow.loadtest.bench

bench-consumer: $(STAMP)
	$(BIN)/python -m intentflow.loadtest.bench consumer

bench-bridge: $(STAMP)
	$(WRK)
	$(BIN)/python -m intentflow.loadtest.bench bridge

bench-compare: $(STAMP)
	$(BIN)/python -m intentflow.loadtest.bench compare

# The topics' contract as an AsyncAPI document, from schemas/ (a test fails when it is stale).
contract: $(STAMP)
	$(BIN)/python -m intentflow.schemas.asyncapi > docs/asyncapi.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
