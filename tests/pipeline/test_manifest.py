"""index.json is validated at open, and shard checksums are verified once and cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lowmem_core.errors import PipelineError
from pipeline.manifest import VERIFIED_NAME, read_manifest, verify_checksums


@pytest.fixture
def dataset(make_dataset) -> Path:
    return make_dataset(num_docs=50, median_len=20)


def _edit_index(dataset: Path, edit) -> None:
    index = json.loads((dataset / "index.json").read_text())
    edit(index)
    (dataset / "index.json").write_text(json.dumps(index))


def test_a_built_dataset_has_a_valid_manifest(dataset):
    manifest = read_manifest(dataset)
    assert manifest.num_documents == 50
    assert sum(f.num_tokens for f in manifest.files) == manifest.num_tokens
    assert manifest.eos_id < manifest.vocab_size
    assert manifest.kind == "text" and manifest.raw["kind"] == "text"


def test_an_index_written_before_kinds_existed_reads_as_text(dataset):
    _edit_index(dataset, lambda i: i.pop("kind"))
    assert read_manifest(dataset).kind == "text"


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda i: i.pop("num_tokens"), "lacks num_tokens"),
        (lambda i: i.update(num_documents="50"), "num_documents must be an integer"),
        (lambda i: i.update(dtype="int8"), "dtype must be uint16 or uint32"),
        (lambda i: i.update(vocab_size=70000), "does not fit dtype uint16"),
        (lambda i: i["tokenizer"].update(eos_id=10**6), "tokenizer.eos_id must be a token id"),
        (lambda i: i["tokenizer"].pop("eos_id"), "tokenizer.eos_id"),
        (lambda i: i["tokenizer"].update(bos_id=-3), "tokenizer.bos_id"),
        (lambda i: i.update(tokenizer="byte"), "lacks the tokenizer object"),
        (lambda i: i.update(files=[]), "lists no shard files"),
        (lambda i: i["files"][0].update(name="../../etc/passwd"), "must be a file name inside"),
        (lambda i: i["files"][0].update(sha256="abc"), "sha256 must be 64 hex digits"),
        (lambda i: i["files"][0].update(num_tokens=1), "tokens, not the"),
        (lambda i: i.update(format="something/2"), "is not a lowmem-tokens/1 index"),
        (lambda i: i.update(kind="chat"), "kind must be 'text' or 'sft', found 'chat'"),
    ],
)
def test_a_damaged_index_is_refused_naming_the_field_and_the_fix(dataset, edit, named):
    _edit_index(dataset, edit)
    with pytest.raises(PipelineError) as info:
        read_manifest(dataset)
    message = str(info.value)
    assert named in message
    assert "pipeline build" in message and "\n" not in message


def test_checksums_are_verified_once_and_a_changed_shard_again(dataset):
    manifest = read_manifest(dataset)
    assert verify_checksums(dataset, manifest) == [f.name for f in manifest.files]
    assert verify_checksums(dataset, manifest) == []
    shard = dataset / manifest.files[0].name
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert verify_checksums(dataset, manifest) == [manifest.files[0].name]


def test_a_flipped_bit_is_caught(dataset):
    manifest = read_manifest(dataset)
    shard = dataset / manifest.files[0].name
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="fails its sha256 check"):
        verify_checksums(dataset, manifest)


def test_a_vocabulary_smaller_than_the_stored_ids_is_caught(dataset):
    _edit_index(
        dataset,
        lambda i: (
            i.update(vocab_size=100) or i["tokenizer"].update(eos_id=99, pad_id=99, bos_id=None)
        ),
    )
    with pytest.raises(PipelineError, match="holds token id .* says vocab_size 100"):
        verify_checksums(dataset, read_manifest(dataset))


def test_a_read_only_dataset_keeps_its_record_in_the_user_cache(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Tests run as root, which may write anywhere: the folder is made to look read-only.
    real_access = os.access
    monkeypatch.setattr(
        "pipeline.manifest.os.access",
        lambda path, mode: False if Path(path) == dataset else real_access(path, mode),
    )
    manifest = read_manifest(dataset)
    assert verify_checksums(dataset, manifest)
    assert not (dataset / VERIFIED_NAME).exists()
    assert list((tmp_path / "cache" / "lowmem-pipeline").glob("verified-*.json"))
    assert verify_checksums(dataset, manifest) == []
