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

.PHONY: venv demo demo-finetune test test-all lint fmt clean

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

FT_DIR := $(DEMO_DIR)/finetune

# Fine-tune "your own" model: a tiny Llama-style folder and prompt/response records made from the
# sample corpus, built with the model's tokenizer, LoRA-tuned as a 3-rank CPU job with eval, and
# the export loaded back with transformers to answer one held-out prompt.
demo-finetune: venv
	rm -rf $(FT_DIR)
	$(PY) -m trainer_low_mem.sample_model $(FT_DIR)
	$(PY) -m pipeline build $(FT_DIR)/train.jsonl --out $(FT_DIR)/train --tokenizer $(FT_DIR)/model --sft
	$(PY) -m pipeline build $(FT_DIR)/eval.jsonl --out $(FT_DIR)/eval --tokenizer $(FT_DIR)/model --sft
	CUDA_VISIBLE_DEVICES= $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu_3proc.yaml \
		train_low_mem.py train --model $(FT_DIR)/model --data $(FT_DIR)/train \
		--eval_data $(FT_DIR)/eval --eval_every 20 --lora_rank 16 --lr 3e-3 --warmup_steps 5 \
		--global_batch 24 --max_seq_len 256 --max_steps 60 --log_every 10 \
		--output_dir $(FT_DIR)/model_save
	$(PY) -m trainer_low_mem.sample_model $(FT_DIR) --generate $(FT_DIR)/model_save/final

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
