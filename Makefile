# The two commands the README promises. Each sets up its own virtual environment.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedsynth-installed

.PHONY: demo test install clean

install: $(STAMP)

# torch first, from the CPU wheel: any other route pulls gigabytes of CUDA.
# pip byte-compiles file by file on one core; compileall does it on every core instead (on the
# 2-core machine, 2026-12-03: install 127 s -> 94 s, byte-compiling 62 s -> 31 s). Files that
# do not compile (torch's Python 3.12-only test helper) are skipped, as pip skips them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	$(PY) -c "import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedsynth demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .pytest_cache
