# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (a bare `pip install torch` pulls several GB of CUDA wheels).
# GPU users: `make TORCH_SPEC= VENV_FLAGS=--system-site-packages` keeps the torch already installed.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
DEMO_DIR ?= .demo

ifeq ($(CI),true)
PYTEST_MARKS :=
else
PYTEST_MARKS := -m "not slow"
endif

.PHONY: venv demo test test-all clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test,tokenizers]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipeline demo --workdir $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q $(PYTEST_MARKS)

test-all: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
