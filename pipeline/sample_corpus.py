"""The sample corpus: a few MB of English-like documents, generated deterministically.

The project ships no data files; the demo and the tests generate the same corpus from a seed.
Documents are short encyclopaedia-style articles about made-up towns, rivers and people, built
from a small grammar, so a model's loss visibly falls within a few dozen steps, lengths vary
(lognormal-like, from one sentence to several paragraphs) and the text is valid UTF-8 with some
multi-byte characters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_SYLLABLES = [
    "ka",
    "lo",
    "ri",
    "ven",
    "dal",
    "mor",
    "sa",
    "thi",
    "bru",
    "en",
    "ost",
    "vel",
    "ar",
    "gu",
    "ni",
    "za",
]
_KINDS = ["town", "river", "valley", "harbour", "village", "mountain", "lake", "forest"]
_REGIONS = [
    "the northern coast",
    "the eastern plains",
    "the old highlands",
    "the southern marshes",
    "the western isles",
]
_TRADES = [
    "fishing",
    "weaving",
    "salt mining",
    "glass making",
    "sheep farming",
    "boat building",
    "bee keeping",
]
_ADJECTIVES = [
    "quiet",
    "busy",
    "ancient",
    "windy",
    "green",
    "narrow",
    "famous",
    "remote",
    "cold",
    "sunny",
]
_FOODS = [
    "smoked trout",
    "barley bread",
    "honey cake",
    "goat cheese",
    "plum wine",
    "crème brûlée",
    "pickled herring",
]
_PEOPLE = [
    "a poet",
    "a cartographer",
    "a merchant",
    "an astronomer",
    "a shipwright",
    "a composer",
    "a botanist",
]
_MONTHS = ["January", "March", "May", "July", "September", "November"]


def _name(rng: np.random.Generator) -> str:
    parts = rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))
    return "".join(parts).capitalize()


def _sentence(rng: np.random.Generator, place: str, kind: str) -> str:
    pick = int(rng.integers(0, 8))
    if pick == 0:
        return f"{place} is a {rng.choice(_ADJECTIVES)} {kind} in {rng.choice(_REGIONS)}."
    if pick == 1:
        return f"Most people in {place} live from {rng.choice(_TRADES)} and {rng.choice(_TRADES)}."
    if pick == 2:
        year = int(rng.integers(1100, 1990))
        return f"In {year}, {rng.choice(_PEOPLE)} named {_name(rng)} settled near the {kind}."
    if pick == 3:
        return (
            f"The local dish is {rng.choice(_FOODS)}, served every {rng.choice(_MONTHS)} "
            "at the market."
        )
    if pick == 4:
        km = int(rng.integers(2, 400))
        return f"It lies {km} km from {_name(rng)}, the nearest {rng.choice(_KINDS)}."
    if pick == 5:
        people = int(rng.integers(40, 90000))
        return f"About {people} people lived in {place} at the last count."
    if pick == 6:
        return (
            f"Visitors describe the {kind} as {rng.choice(_ADJECTIVES)} "
            f"and {rng.choice(_ADJECTIVES)}."
        )
    return (
        f"The name {place} comes from an old word for a {rng.choice(_ADJECTIVES)} "
        f"{rng.choice(_KINDS)}."
    )


def generate_documents(num_docs: int = 6000, seed: int = 1234) -> list[str]:
    """Return `num_docs` documents; the same (num_docs, seed) always gives the same text."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        place, kind = _name(rng), str(rng.choice(_KINDS))
        # Paragraph and sentence counts drawn so document lengths are heavy-tailed, like real
        # corpora.
        n_paragraphs = 1 + min(int(rng.lognormal(0.0, 0.7)), 6)
        paragraphs = []
        for _ in range(n_paragraphs):
            n_sentences = 1 + min(int(rng.lognormal(0.8, 0.6)), 12)
            paragraphs.append(" ".join(_sentence(rng, place, kind) for _ in range(n_sentences)))
        docs.append(f"{place} ({kind})\n" + "\n".join(paragraphs))
    return docs


def write_sample_corpus(out_dir: Path, num_docs: int = 6000, seed: int = 1234) -> dict[str, Path]:
    """Write the corpus as `sample.txt` (blank-line separated) and `sample.jsonl`; return both
    paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = generate_documents(num_docs, seed)
    txt = out_dir / "sample.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jsonl = out_dir / "sample.jsonl"
    with jsonl.open("w", encoding="utf-8") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"id": i, "text": doc}, ensure_ascii=False) + "\n")
    return {"txt": txt, "jsonl": jsonl}


SFT_TASKS = ("qa", "summarise")


def write_sample_sft(
    out_dir: Path, num_train: int = 2000, num_eval: int = 100, seed: int = 1234, task: str = "qa"
) -> dict[str, Path]:
    """Prompt/response records made from the sample corpus. task "qa": the prompt asks about a
    place, the response is its article's first paragraph (short prompts, longer responses);
    "summarise": the prompt is the whole article, the response its first sentence (prompts of
    varied length, short responses, as an encoder-decoder is often fine-tuned). Writes
    `train.jsonl` and `eval.jsonl` (disjoint documents); returns both paths."""
    if task not in SFT_TASKS:
        raise ValueError(f"task must be one of {SFT_TASKS}, got {task!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = generate_documents(num_train + num_eval, seed)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    splits = {"train": docs[:num_train], "eval": docs[num_train:]}
    for split, path in paths.items():
        with path.open("w", encoding="utf-8") as fh:
            for doc in splits[split]:
                title, _, body = doc.partition("\n")
                if task == "qa":
                    record = {
                        "prompt": f"Tell me about {title}.\n",
                        "response": body.split("\n")[0],
                    }
                else:
                    first = body.split(". ")[0].rstrip(".") + "."
                    record = {"prompt": f"Summarise: {title}\n{body}\n", "response": first}
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths
