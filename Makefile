# Two commands set everything up on a fresh machine with Python 3.11 and no Docker:
#   make demo    run the main job on embedded services
#   make test    lint, type-check and run the whole suite
# and for working on it with the Stripe CLI:
#   make dev     the embedded services, the bridge and a consumer, in the foreground
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint unit demo dev bench bench-consumer bench-bridge bench-compare contract lock clean \
	test-tools asyncapi-parser promtool

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

# The pooler tests run PgBouncer from Debian's package (devservices/pgbouncer.py installs
# it too when a test starts without it, as root).
PGBOUNCER := command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || \
	(apt-get update -qq && apt-get install -y -qq pgbouncer)

test: lint test-tools
	$(PGBOUNCER)
	$(BIN)/pytest

# What the tests run beside Python, installed from the project's own files:
# the official AsyncAPI parser (npm, pinned by tests/asyncapi/package-lock.json)
# checks docs/asyncapi.json; promtool (Debian's prometheus package) checks the
# alert rules of deploy/k8s/monitoring. Each is installed only when missing.
test-tools: asyncapi-parser promtool

asyncapi-parser: tests/asyncapi/node_modules/.package-lock.json

tests/asyncapi/node_modules/.package-lock.json: tests/asyncapi/package.json tests/asyncapi/package-lock.json
	npm ci --prefix tests/asyncapi --no-audit --no-fund --ignore-scripts --loglevel=error

promtool:
	command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus)

unit: $(STAMP)
	$(BIN)/pytest tests/unit

demo: $(STAMP)
	$(BIN)/python -m intentflow.loadtest.demo

# Ctrl-C stops it all. It prints the `stripe listen --forward-to` line and the addresses
# to connect to; `stripe listen` signs with a secret of its own, so give the bridge that one:
#   make dev STRIPE_WEBHOOK_SECRET=$(stripe listen --print-secret)
# BRIDGE_PORT (8000) and CONSUMER_HTTP_PORT (8081) choose the ports. `seed-cart` makes a cart.
dev: $(STAMP)
	$(BIN)/python -m intentflow.devservices.dev

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

# The image's locks (deploy/Dockerfile installs them with --require-hashes): the
# runtime dependencies, no extras, and the build backend, each pinned with the
# hashes of its files, resolved for the image's Python and platform rather than
# this machine's. Versions already locked stay unless pyproject.toml moves them;
# `make lock UPGRADE=1` takes the newest that fit.
LOCK := $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command 'make lock' \
	$(if $(UPGRADE),--upgrade)

lock: $(STAMP)
	$(LOCK) pyproject.toml -o deploy/requirements.lock
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(LOCK) - -o deploy/build.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
