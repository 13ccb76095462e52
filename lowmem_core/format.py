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
KIND_TEXT = "text"
KIND_SFT = "sft"
