# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run dev test lint bench clean browser redis

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

## Start the cache on SQLite at $HOST:$PORT (default 0.0.0.0:8000) with the production config.
run: $(VENV)/.installed
	$(BIN)/gunicorn -c gunicorn.conf.py 'server:create_app()'

## Everything CI checks: the Dockerfile lint and the whole test suite.
test: $(VENV)/.installed-dev lint browser redis
	$(BIN)/python -m pytest -q

## Debian's chromium for the dashboard's headless-browser test (nothing to do once installed).
browser:
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

## Debian's redis-server: the Redis store's tests start their own on a free port (never skipped);
## openssl makes the certificate of the TLS (rediss://) test.
redis:
	@test -x /usr/bin/redis-server -a -x /usr/bin/openssl || (apt-get update && apt-get install -y redis-server openssl)

lint: $(VENV)/.installed-dev
	$(BIN)/hadolint Dockerfile

## Speed and concurrency figures (not part of `make test`).
bench: $(VENV)/.installed-dev redis
	$(BIN)/python bench/run.py
	$(BIN)/python bench/replay.py

## 10,000 hostile requests against the production server (gunicorn, as `make run`, on a free port,
## in front of the fake upstream); prints a status histogram. FUZZ_ARGS="--seed N" replays a run.
.PHONY: fuzz
fuzz: $(VENV)/.installed-dev
	$(BIN)/python tests/hostile_requests.py --requests 10000 $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
