"""On-disk and in-batch constants shared by the writer, the readers and the trainer.

The build writes them, the dataset and the loader read them, the model and the loss honour them;
keeping them here lets the reader side import no writer code.
"""

FORMAT = "lowmem-tokens/1"  # the `format` field of a dataset's index.json
INDEX_NAME = "index.json"
COLUMN = "input_ids"  # the token-list column of every shard
IGNORE_INDEX = -100  # label of a position that carries no loss (padding, prompt tokens)
# Prompt/response datasets (`pipeline build --sft`): each shard also holds this uint32 column, the
# number of prompt tokens at the start of each document (sample); index.json says "kind": "sft".
PROMPT_LENGTHS_COLUMN = "prompt_lengths"
# Prompt/response datasets: each shard also holds this uint8 column beside PROMPT_LENGTHS_COLUMN,
# 1 where the build cut the sample's response to fit --max-sample-tokens (its EOS is no target).
# Shards written before it existed lack it: no response of theirs counts as cut.
RESPONSE_CUT_COLUMN = "response_cut"
# Chat datasets: a list<uint32> column beside PROMPT_LENGTHS_COLUMN holding, flat, the (start,
# length) token spans of a document that carry labels (its assistant turns), or an empty list
# where the labels are the one span from the prompt length to the end. A document with spans
# keeps the start of its last span as its prompt length, so a reader that knows only prompt
# lengths trains its last turn. Shards (and datasets) written before it existed lack it.
LABEL_SPANS_COLUMN = "label_spans"
KIND_TEXT = "text"
KIND_SFT = "sft"
