# The two commands a user needs: `make run` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=
# One stamp per requirements file: each is installed once, and again when it changes.
SERVER := $(VENV)/.installed-server
AGENT := $(VENV)/.installed-agent
TESTS := $(VENV)/.installed-tests

.PHONY: run demo test bench bench-agent bench-disk screenshot venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# Order-only on the venv: the interpreter's own timestamp must not trigger a reinstall.
$(SERVER): requirements.txt | $(PY)
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(AGENT): requirements-agent.txt | $(PY)
	$(VENV)/bin/pip install -q -r requirements-agent.txt
	touch $@

$(TESTS): requirements-test.txt requirements.txt requirements-agent.txt | $(PY)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

# The server's runtime only: what a droplet needs.
venv: $(SERVER)

# Writes .env on first run, prints the agent command, then runs the Procfile's own command.
run: venv
	@$(PY) config.py --init-env
	@export PATH="$(abspath $(VENV))/bin:$$PATH" PORT="$${PORT:-$$($(PY) config.py --port)}"; \
	cmd=$$(sed -n 's/^web: //p' Procfile); echo "+ $$cmd"; exec sh -c "exec $$cmd"

# The server plus three simulated agents with their own fresh keys: a live fleet, no GPU needed.
# Keys go in the agents' environment (readable by their owner only), never on a command line.
# It is open to read (DASHBOARD_PUBLIC=1, unless set): simulated PCs, nothing to sign in to. Its
# history is a file of its own, so the PCs it makes up never show in what `make run` serves.
demo: $(SERVER) $(AGENT)
	@export DASHBOARD_PUBLIC="$${DASHBOARD_PUBLIC:-1}" HISTORY_DB="$${DEMO_HISTORY_DB:-demo-history.sqlite3}"; \
	export PATH="$(abspath $(VENV))/bin:$$PATH" PORT="$${PORT:-$$($(PY) config.py --port)}"; \
	k1=$$($(PY) config.py --new-key); k2=$$($(PY) config.py --new-key); k3=$$($(PY) config.py --new-key); \
	export DEVICE_KEYS="render-box:$$k1,workstation:$$k2,lab-rig:$$k3"; \
	cmd=$$(sed -n 's/^web: //p' Procfile); sh -c "exec $$cmd" & server=$$!; \
	trap 'kill $$server $$agents 2>/dev/null; wait' EXIT INT TERM; \
	until $(PY) -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$$PORT/healthz', timeout=1)" 2>/dev/null; do \
		kill -0 $$server 2>/dev/null || exit 1; sleep 0.3; done; \
	url=http://127.0.0.1:$$PORT/push-sse; \
	DEVICE_KEY=$$k1 $(PY) agent.py --url $$url --simulate 4 & agents="$$!"; \
	DEVICE_KEY=$$k2 $(PY) agent.py --url $$url --simulate 2 & agents="$$agents $$!"; \
	DEVICE_KEY=$$k3 $(PY) agent.py --url $$url --simulate 1 & agents="$$agents $$!"; \
	echo "Demo fleet of 3 simulated PCs is live: open http://localhost:$$PORT/  (Ctrl-C stops it)"; \
	wait $$server

test: $(TESTS)
	$(PY) -m pytest $(PYTEST_ARGS)

# bench/fanout.py starts the server and pushes with requests; --agent runs the agent's GPUtil backend.
bench: $(SERVER) $(AGENT)
	$(PY) -m bench $(BENCH_ARGS)

bench-agent: $(AGENT)
	$(PY) -m bench --agent 200

# History's disk and Redis memory per GPU in steady state (400 simulated days through the real stores).
bench-disk: $(TESTS)
	$(PY) -m bench.disk --redis $(BENCH_ARGS)

screenshot: $(TESTS)
	$(PY) docs/screenshot.py

clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
