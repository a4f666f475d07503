# The two commands: `make test` and `make bench`. Each creates .venv if absent and installs
# what it needs. torch goes in first so setup.py can decide whether to build fastvl._C
# (it does when a CUDA toolkit and a CUDA-enabled torch are present; FASTVL_BUILD_CUDA=0|1
# forces the choice).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.6
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := pyproject.toml setup.py $(wildcard csrc/*)

.PHONY: test bench wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# One install for both commands (test and bench extras), so `make bench` after `make test`
# does not rebuild fastvl._C.
$(VENV)/.installed: $(SOURCES) | $(PY)
	$(PIP) install "$(TORCH_SPEC)" ninja
	$(PIP) install --no-build-isolation -e ".[test,bench]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(PY) -m fastvl bench $(BENCH_ARGS)

clean:
	rm -rf build dist fastvl/_C*.so fastvl/_C_build.json *.egg-info fastvl-bench-results

# Distributions for GPU clusters, in dist/: the sdist (builds fastvl._C anywhere), a pure wheel
# (py3-none-any, triton / torch backends only) and a CUDA wheel built from that sdist for this
# Python, this torch (pinned in its metadata) and TORCH_CUDA_ARCH_LIST (default 8.0;9.0);
# MAX_JOBS and NVCC_THREADS speed up the compile. See the README's "Building wheels".
wheels: $(VENV)/.installed
	rm -rf dist
	FASTVL_BUILD_CUDA=0 $(PY) -I setup.py -q sdist -d dist
	FASTVL_BUILD_CUDA=0 $(PIP) wheel -q --no-build-isolation --no-deps -w dist dist/fastvl-*.tar.gz
	FASTVL_BUILD_CUDA=1 $(PIP) wheel -q --no-build-isolation --no-deps -w dist dist/fastvl-*.tar.gz
	$(PY) -m fastvl.wheels dist
