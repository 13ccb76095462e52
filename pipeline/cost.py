"""The data path's own cost model: host bytes a batch and a reader thread take, per token, and
the index files a node's ranks share (pipeline/index_cache.py)."""

BATCH_BYTES_PER_TOKEN = 3 * 8
READER_SCRATCH_BYTES_PER_TOKEN = 5 * 8 + 4
READER_THREAD_BYTES = 1 << 20
# Epoch indexes a node keeps at once: the current one and the next, prepared ahead.
SHARED_EPOCH_INDEXES = 2


def shared_index_bytes(num_docs: int, sft: bool = False, num_spans: int = 0) -> int:
    """Bytes of a dataset's shared index files on one node, whatever its rank count: int64
    document starts (and sft int64 prompt lengths and one-byte cut flags; with `num_spans`
    labelled spans, int64 span starts and 16 bytes a span) plus
    SHARED_EPOCH_INDEXES epoch indexes (uint32 permutation below 2^32 documents, int64 beyond;
    int64 row layout). In the page cache."""
    perm_bytes = 4 if num_docs < 1 << 32 else 8
    docs = 8 * (num_docs + 1) + (9 * num_docs if sft else 0)
    if num_spans:
        docs += 8 * (num_docs + 1) + 16 * num_spans
    return docs + SHARED_EPOCH_INDEXES * (perm_bytes * num_docs + 8 * (num_docs + 1))
