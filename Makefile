# The two set-up commands of the README: `make bench` (main job) and `make test`.
# Both build .venv in the repository root and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench test system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[torch,test]'
	touch $(STAMP)

# Debian packages: Fashion-MNIST (the embedded benchmark's real data) and the
# fonts its letter-glyph OOD set is rendered from.
DEBIAN_PACKAGES := dataset-fashion-mnist fonts-dejavu-core fonts-liberation fonts-freefont-ttf fonts-urw-base35
system-deps:
	@if ! dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then \
	  apt-get install -y -q $(DEBIAN_PACKAGES) || (apt-get update -q && apt-get install -y -q $(DEBIAN_PACKAGES)); \
	fi

bench: $(STAMP)
	$(PY) -m benchmarks.throughput

# One worker per core (at most 4: each holds a JAX runtime). worksteal hands each
# worker a contiguous run of tests (a file's module fixtures are mostly built once)
# and, unlike loadfile, carries on when a worker dies. A test that takes its worker
# down (an XLA:CPU compiler segfault was seen once in CI, never reproduced) runs
# once more on a fresh worker; an ordinary failure is never rerun.
# `-m 'not slow'` skips the end-to-end runs.
test: $(STAMP) system-deps
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal \
	  --reruns 1 --only-rerun 'worker .* crashed'

