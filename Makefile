# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=

.PHONY: run test bench venv clean

$(VENV)/.installed: requirements.txt requirements-agent.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Writes .env on first run, prints the agent command, then runs the Procfile's own command.
run: venv
	@$(PY) config.py --init-env
	@export PATH="$(abspath $(VENV))/bin:$$PATH" PORT="$${PORT:-$$($(PY) config.py --port)}"; \
	cmd=$$(sed -n 's/^web: //p' Procfile); echo "+ $$cmd"; exec sh -c "exec $$cmd"

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache __pycache__ tests/__pycache__
