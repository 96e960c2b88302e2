# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
AGENTS ?= 1
export SCHEDULER_DATA_DIR ?= .scheduler

.PHONY: run test test-postgres install browser lint clean wire token

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) manage.py runlocal --port $(PORT) --agents $(AGENTS)

# A new API token, printed once: `make token` (for admin) or `make token USER=alice`;
# `T=$$(make -s token)` captures it. USER only counts when given on the command
# line: the environment's USER is the login name. No install here: a fresh
# venv has no user yet, so point at `make run` instead; migrate is a no-op once done.
TOKEN_USER := $(if $(filter command line,$(origin USER)),$(USER),admin)
token:
	@test -x $(PY) || { echo "no $(VENV) yet: run 'make run' first" >&2; exit 1; }
	@$(PY) manage.py migrate -v0 && $(PY) manage.py apitoken $(TOKEN_USER)

# Browser tests drive Debian's Chromium; install it when it is missing and we may.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "Chromium is missing: run 'sudo apt-get install chromium' for the browser tests"; \
		fi; \
	fi

test: $(VENV)/.installed browser
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite on PostgreSQL and Redis (CI's second stage). pytest-django makes
# and drops test_<database of PG_URL>; each e2e server gets a database and a Redis
# prefix of its own (tests/harness.py). Unreachable engines fail the run at once
# (tests/conftest.py), they never skip it.
PG_URL ?= postgres://postgres@127.0.0.1:5432/scheduler_suite
REDIS ?= redis://127.0.0.1:6379/0
# The scale-out tests make databases of their own and ran in `make test` already.
test-postgres: $(VENV)/.installed browser
	DATABASE_URL=$(PG_URL) REDIS_URL=$(REDIS) $(PY) -m pytest -m "not scale_out" $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# The agent's verbatim copy of scheduler_site/wire.py (tests/test_protocol.py checks it).
wire: $(VENV)/.installed
	$(PY) manage.py embed-wire

clean:
	rm -rf $(VENV) .pytest_cache

# The benchmark (issue 6): real servers and agents, one JSON object on stdout,
# progress on stderr. Scale it down with e.g. BENCH_ARGS="--runs 200 --only latency".
.PHONY: bench
bench: $(VENV)/.installed
	@$(PY) tests/bench.py $(BENCH_ARGS)
