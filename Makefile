# The two commands: `make test` and `make bench`. Each creates .venv if absent and installs
# what it needs. torch goes in first so setup.py can decide whether to build fastvl._C
# (it does when a CUDA toolkit and a CUDA-enabled torch are present; FASTVL_BUILD_CUDA=0|1
# forces the choice).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := pyproject.toml setup.py $(wildcard csrc/*)

.PHONY: test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

$(VENV)/.installed-%: $(SOURCES) | $(PY)
	$(PIP) install "torch>=2.6" ninja
	$(PIP) install --no-build-isolation -e ".[$*]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(PY) -m fastvl bench $(BENCH_ARGS)

clean:
	rm -rf build fastvl/_C*.so *.egg-info fastvl-bench-results
