# Set-up and the README's commands: `make demo`, `make test` (the fast tier), `make test-all` (what CI runs).
# The venv gets the CPU build of torch first (TORCH, overridable), so that installing ckv does not pull a
# multi-GB CUDA build; the package itself only asks torch>=2.1.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_CKPT ?= sample_checkpoints/sasrec-ml1m.safetensors
DEMO_OUT ?= runs/demo

.PHONY: setup setup-all demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	touch $@

# the full tier also runs the fused GPU kernel's tests on the CPU, under Triton's interpreter (~290 MB wheel)
setup-all: $(VENV)/.installed-all

$(VENV)/.installed-all: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[gpu]'
	touch $@

demo: setup
	mkdir -p $(DEMO_OUT)
	$(VENV)/bin/ckv compress $(DEMO_CKPT) --data ml-1m -o $(DEMO_OUT)/sasrec-ml1m.ckv.safetensors --force --json $(DEMO_OUT)/compress.json

test: setup
	$(VENV)/bin/pytest -q -m "not slow"

test-all: setup-all
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
