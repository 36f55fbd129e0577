# pyvattn top-level targets. `make demo` and `make test` each build their own venv (.venv) after
# scripts/prereqs.sh has checked the system packages they need (.ci/apt-prerequisites, README).
# The driver targets are implemented in kmod/ (see README, "The 64 KiB driver").

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

.PHONY: all prereqs demo test lint pytest info bench venv driver driver-check driver-harness install-driver \
        uninstall-driver clean distclean

all: test

## The system packages this needs; names the first one missing.
prereqs:
	@scripts/prereqs.sh $(PYTHON)

$(STAMP): pyproject.toml | prereqs
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install -qq -e ".[test,hf,frag]"  # -qq: without setuptools' banner about editable installs
	touch $(STAMP)

venv: $(STAMP)

## Main job: KV tensors growing for a batch of requests from a real trace (host backend without a GPU).
demo: $(STAMP)
	$(PY) -m pyvattn demo

info: $(STAMP)
	$(PY) -m pyvattn info

## Tests: ruff, the Python suite, the kernel patch compiled against Debian's driver sources, and the
## patch's own code run in user space against a model GPU (ASan/UBSan; HARNESS_OPS=N for more).
test: lint pytest driver-check driver-harness

lint: $(STAMP)
	$(PY) -m ruff check .

pytest: $(STAMP)  # one worker per core, at most 4 (-n: pytest-xdist)
	@$(PY) -c 'from pyvattn.frag import compiled; compiled.warm()'  # compiled once, not in every worker
	$(PY) -m pytest -q -n auto --maxprocesses 4

## Host benchmark into bench-results/bench_host.json (SAVE=1: benchmarks/results/, the committed results).
bench: $(STAMP)
	$(PY) scripts/bench_host.py $(if $(SAVE),--save)

driver driver-check install-driver uninstall-driver:
	$(MAKE) -C kmod $@

driver-harness:
	$(MAKE) --no-print-directory -C driver-patch/harness run

driver-check driver-harness: | prereqs

clean:
	rm -rf $(VENV) build *.egg-info
	-$(MAKE) -C kmod clean
	-$(MAKE) -C driver-patch/harness clean

## Also the downloads (.cache: Debian packages for the driver check) and benchmark outputs (bench-results/).
distclean: clean
	rm -rf .cache bench-results
