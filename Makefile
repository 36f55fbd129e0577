# pyvattn top-level targets. `make demo` and `make test` each build their own venv (.venv).
# The driver targets are implemented in kmod/ (see README, "The 64 KiB driver").

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

.PHONY: all demo test pytest info bench venv driver driver-check driver-harness install-driver uninstall-driver clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,hf]"
	touch $(STAMP)

venv: $(STAMP)

## Main job: KV tensors growing for a batch of requests from a real trace (host backend without a GPU).
demo: $(STAMP)
	$(PY) -m pyvattn demo

info: $(STAMP)
	$(PY) -m pyvattn info

## Tests: the Python suite, the kernel patch compiled against Debian's driver sources, and the
## patch's own code run in user space against a model GPU (ASan/UBSan; HARNESS_OPS=N for more).
test: pytest driver-check driver-harness

pytest: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) scripts/bench_host.py

driver driver-check install-driver uninstall-driver:
	$(MAKE) -C kmod $@

driver-harness:
	$(MAKE) --no-print-directory -C driver-patch/harness run

clean:
	rm -rf $(VENV) build *.egg-info
	-$(MAKE) -C kmod clean
	-$(MAKE) -C driver-patch/harness clean
