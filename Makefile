# The two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
AGENTS ?= 1
export SCHEDULER_DATA_DIR ?= .scheduler

.PHONY: run test install browser lint clean wire

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) manage.py runlocal --port $(PORT) --agents $(AGENTS)

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
