"""The data path's own cost model: host bytes a batch and a reader thread take, per token."""

BATCH_BYTES_PER_TOKEN = 3 * 8
READER_SCRATCH_BYTES_PER_TOKEN = 5 * 8 + 4
READER_THREAD_BYTES = 1 << 20
