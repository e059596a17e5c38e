# The two commands the README promises. Each sets up its own virtual environment.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedsynth-installed

.PHONY: demo test install clean

install: $(STAMP)

# torch first, from the CPU wheel: any other route pulls gigabytes of CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsynth demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
