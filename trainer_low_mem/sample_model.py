"""A tiny Llama-style Hugging Face folder made locally: the stand-in for a user's own model in
the fine-tune demo and the tests (no hub download anywhere).

`write_sample_model(out)` trains a byte-level BPE tokenizer on the sample corpus (BOS, EOS, PAD
and a chat template included), builds a `LlamaForCausalLM` from a small config with seeded
weights, and saves both with `save_pretrained`, as a model downloaded from the hub would be.
`python -m trainer_low_mem.sample_model OUT` writes it with the sample prompt/response data;
`--generate EXPORT` loads an export back with `transformers` and answers one eval prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowmem_core.errors import require_extra, run_cli
from pipeline.sample_corpus import generate_documents, write_sample_sft

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_sample_model(
    out: Path,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    with_weights: bool = True,
) -> Path:
    """Write a tokenizer + LlamaConfig (+ seeded weights) folder at `out`; return `out`."""
    transformers = require_extra("transformers", "hf", "the sample Hugging Face model")
    tokenizers = require_extra("tokenizers", "tokenizers", "training the sample tokenizer")
    out = Path(out)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(generate_documents(500, seed=seed + 7), trainer)
    # BOS before every text, as Llama's tokenizer does.
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(out)
    config = transformers.LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    if with_weights:
        import torch

        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(config).save_pretrained(out)
    else:
        config.save_pretrained(out)
    return out


def generate(export_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    """Load an export with transformers (as a user would) and greedily answer `prompt`."""
    transformers = require_extra("transformers", "hf", "loading an export")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer_low_mem.sample_model")
    parser.add_argument("out", type=Path, help="folder for model/, train.jsonl, eval.jsonl")
    parser.add_argument("--generate", type=Path, help="an export to load and answer one prompt")
    args = parser.parse_args(argv)
    if args.generate is not None:
        with (args.out / "eval.jsonl").open() as fh:
            prompt = json.loads(fh.readline())["prompt"]
        print(f"prompt: {prompt!r}\nanswer: {generate(args.generate, prompt)!r}")
        return
    write_sample_model(args.out / "model")
    paths = write_sample_sft(args.out)
    print(f"wrote {args.out / 'model'}, {paths['train']} and {paths['eval']}")


if __name__ == "__main__":
    raise SystemExit(run_cli(_main))
