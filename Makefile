# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (a bare `pip install torch` pulls several GB of CUDA wheels).
# GPU users: `make TORCH_SPEC= VENV_FLAGS=--system-site-packages` keeps the torch already installed.
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
DEMO_DIR ?= .demo
# Extras installed into .venv: `test` (pytest, ruff and every optional feature the suite runs)
# covers `make demo` too (bench baselines and plot, tokenizers).
EXTRAS ?= test,bench,tokenizers

ifeq ($(CI),true)
PYTEST_MARKS :=
else
PYTEST_MARKS := -m "not slow"
endif

.PHONY: venv demo test test-all lint fmt clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed

TRAIN_DEMO := train_low_mem.py train --data $(DEMO_DIR)/tokens --model_preset tiny --max_seq_len 256 \
	--global_batch 24 --warmup_steps 5 --lr 3e-3 --log_every 10 --output_dir $(DEMO_DIR)/model_save

# Build and stream the sample corpus, benchmark the loader against its baselines, train 30 steps
# in one process, then resume to step 45 as one 3-rank job. The training half runs on the CPU
# (CUDA_VISIBLE_DEVICES=) so it behaves the same on every machine.
demo: venv
	$(PY) -m pipeline demo --workdir $(DEMO_DIR)
	$(PY) -m bench throughput --quick --data $(DEMO_DIR)/tokens --json $(DEMO_DIR)/bench.json --plot $(DEMO_DIR)/bench.png
	rm -rf $(DEMO_DIR)/model_save
	CUDA_VISIBLE_DEVICES= $(PY) $(TRAIN_DEMO) --max_steps 30
	CUDA_VISIBLE_DEVICES= $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu_3proc.yaml \
		$(TRAIN_DEMO) --max_steps 45 --is_keep_training=True

test: venv
	$(PY) -m pytest -q $(PYTEST_MARKS)

test-all: venv
	$(PY) -m pytest -q

# Formatting and lint rules live in pyproject.toml ([tool.ruff]).
lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

fmt: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
