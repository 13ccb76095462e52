"""The TRL side of `bench sft`: TRL's SFTTrainer at its documented best settings, in the child
process that bench/sft_speed.py starts for it.

Settings: `packing=True, packing_strategy="bfd"` (best-fit-decreasing bins of max_length),
`padding_free=True` (bfd turns it on anyway: each micro-batch is flattened into one row with
position ids restarting at every sample), `completion_only_loss=True` on prompt/completion
records (our records' `response` renamed to `completion`; TRL appends EOS to it), fp32, no
gradient checkpointing (SFTConfig's default is on; ours is off), LoRA through `peft_config` on
every linear layer but the head (peft's "all-linear", the default targets of ours) or full
fine-tuning. The schedule, optimizer settings, micro-batch, accumulation, seed and the one pass
over the records are the ones our side gets (sft_speed.py `_schedule`).

On a CPU model with SDPA attention, padding-free batches carry no attention mask: transformers
derives a block-diagonal causal mask from the position ids (masking_utils
`find_packed_sequence_indices`), a dense [T, T] mask over the flattened micro-batch, so samples do
not attend to each other but every score of the flattened row is computed. TRL's fused LM head
scores positions in tiles; off Triton devices it scores every position, labelled or not.

Metrics TRL computes on every step that no setting turns off: entropy and top-1 accuracy of
every scored position (the fused head's "entropy" and "is_top1" outputs, with a device sync
each), and the running token count; with logging off they are computed and never shown.
"""

from __future__ import annotations

import time
from pathlib import Path

TRL_INSTALL = "pip install 'lowmem-pipeline[trl]'"


def trl_missing() -> str | None:
    """None when TRL imports, else the one line that says why the TRL side is skipped."""
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        return f"trl is not importable ({exc}); {TRL_INSTALL} to compare with TRL's SFTTrainer"
    return None


def run_trl(a: dict, clock) -> dict:
    """Train one pass over `a["train"]` with SFTTrainer; save the (merged) model to
    `a["save"]` when given. `clock` (sft_speed.StepClock) times the optimizer steps."""
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    records = datasets.load_dataset(
        "json", data_files=a["train"], split="train", cache_dir=a["out"]
    ).rename_column("response", "completion")
    tok = transformers.AutoTokenizer.from_pretrained(a["model"], local_files_only=True)
    torch.manual_seed(a["seed"])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a["model"], local_files_only=True, dtype=torch.float32
    )
    s = a["schedule"]
    args = SFTConfig(
        output_dir=a["out"],
        max_length=a["seq_len"],
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        completion_only_loss=True,
        per_device_train_batch_size=a["micro_batch"],
        gradient_accumulation_steps=a["grad_accum"],
        num_train_epochs=1,
        learning_rate=s["lr"],
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=s["lr_warmup_steps"],
        weight_decay=s["weight_decay"],
        adam_beta1=s["adam_beta1"],
        adam_beta2=s["adam_beta2"],
        max_grad_norm=s["max_grad_norm"],
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=a["seed"],
        data_seed=a["seed"],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = None
    if a["tuning"] == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=a["lora_rank"],
            lora_alpha=a["lora_alpha"],
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

    class _Clocked(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            clock.begin_step(state.global_step + 1, model, optimizer)

        def on_step_end(self, args, state, control, **kw):
            clock.end_step()

    class _CountingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clock.add_label_tokens(int((inputs["labels"] != -100).sum()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = _CountingTrainer(
        model=model,
        args=args,
        train_dataset=records,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[_Clocked()],
    )
    prepare_s = time.perf_counter() - started
    trainer.train()
    if a.get("save"):
        trained = trainer.model
        if a["tuning"] == "lora":
            trained = trained.merge_and_unload()
        trained.save_pretrained(Path(a["save"]), safe_serialization=True)
    return {"prepare_s": prepare_s}
