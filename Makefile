# Set-up and the two everyday commands. Every target creates .venv and installs
# what it needs on first use (llama-cpp-python compiles llama.cpp: ~6 minutes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvchat-installed
# llama.cpp is compiled for the machine it runs on, but without its AMX kernels: on
# Intel Xeons with AMX (seen on this project's VMs) they crash the process.
LLAMA_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16

.PHONY: setup demo test lint bench clean

# The coding-agent CLIs (Codex, Claude Code) that tests/test_coding_agents.py runs
# against `kvchat serve`, pinned in agents/package-lock.json; reinstalled when the
# lock changes or agents/node_modules is removed. Needs Node.js >= 20 and npm.
AGENTS_STAMP := agents/node_modules/.kvchat-installed

setup: $(STAMP)

agents-setup: $(AGENTS_STAMP)

$(AGENTS_STAMP): agents/package.json agents/package-lock.json
	npm ci --prefix agents --no-audit --no-fund
	touch $@

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(PY) -m pip install -e '.[models,dev]'
	$(PY) -c "from kvchat import models; [models.resolve(m.name) for m in models.list()]"
	touch $(STAMP)

demo: setup
	$(PY) -m kvchat.demo

test: setup
	$(PY) -m pytest -q -m "not agents"

# Lint, format and type checks of src/ (settings: [tool.ruff] and [tool.mypy] in pyproject.toml).
lint: setup
	$(PY) -m ruff check src
	$(PY) -m ruff format --check src
	$(PY) -m mypy

# The test tiers (markers in tests/conftest.py); `make test` runs all three.
.PHONY: test-fast test-model test-system
test-fast: setup  # no model loaded: seconds, for the edit-test loop
	$(PY) -m pytest -q -m "not model and not system"

test-model: setup  # loads the packaged models in process
	$(PY) -m pytest -q -m "model and not system"

test-system: setup  # kvchat serve and CLI processes, soak, crash and restart
	$(PY) -m pytest -q -m "system and not agents"

# Codex CLI and Claude Code, unchanged, against `kvchat serve` (a few minutes on two
# cores: Codex's first call prefills its ~8.7k-token prompt). Apart from `make test`,
# which stays model-and-Python only; .ci/run runs both. See docs/agents.md.
.PHONY: agents-setup test-agents
test-agents: setup agents-setup
	$(PY) -m pytest -q -m agents

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
