"""Corrupted documents with ground truth: the kinds of text that pollute crawled corpora, made on purpose so that
detection can be measured. Each kind is a pure function of (document bytes, a random generator) that keeps the
document's length, behind a registry (``CORRUPTIONS``); ``Corruption`` corrupts a ``rate`` of the pool's documents,
each with a kind drawn from ``kinds``.

- ``shuffled_lines``: the document's lines in a random order (code that no longer parses);
- ``shuffled_tokens``: its whitespace-separated words in a random order, the whitespace kept in place (word salad);
- ``random_bytes``: printable ASCII drawn uniformly (binary junk, mis-decoded pages);
- ``repeated_line``: one of its lines repeated over its whole length (boilerplate, a stuck generator);
- ``fragments``: cut into pieces of 4-24 bytes, put back in a random order (a page cut up by a bad extractor).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from pmp_lightning.errors import DataConfigError

CorruptionFn = Callable[[bytes, np.random.Generator], bytes]
CORRUPTIONS: dict[str, CorruptionFn] = {}


def corruption(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    def add(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTIONS[name] = fn
        return fn

    return add


def _fit(text: bytes, size: int) -> bytes:
    """``text`` cut or repeated to exactly ``size`` bytes."""
    return (text * (size // max(len(text), 1) + 1))[:size] if text else b" " * size


@corruption("shuffled_lines")
def shuffled_lines(text: bytes, rng: np.random.Generator) -> bytes:
    lines = text.split(b"\n")
    return b"\n".join(lines[i] for i in rng.permutation(len(lines)))


@corruption("shuffled_tokens")
def shuffled_tokens(text: bytes, rng: np.random.Generator) -> bytes:
    parts = re.split(rb"(\s+)", text)  # words at even positions, the whitespace between them at odd ones
    words = parts[0::2]
    order = rng.permutation(len(words))
    parts[0::2] = [words[i] for i in order]
    return b"".join(parts)


@corruption("random_bytes")
def random_bytes(text: bytes, rng: np.random.Generator) -> bytes:
    return rng.integers(32, 127, len(text), dtype=np.uint8).tobytes()


@corruption("repeated_line")
def repeated_line(text: bytes, rng: np.random.Generator) -> bytes:
    lines = [line for line in text.split(b"\n") if line.strip()] or [text]
    return _fit(lines[rng.integers(len(lines))] + b"\n", len(text))


@corruption("fragments")
def fragments(text: bytes, rng: np.random.Generator) -> bytes:
    cuts, at = [0], 0
    while at < len(text):
        at = min(at + int(rng.integers(4, 25)), len(text))
        cuts.append(at)
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    return b"".join(pieces[i] for i in rng.permutation(len(pieces)))


class Corruption:
    """Corrupts a ``rate`` of the documents it is given, each with a kind drawn uniformly from ``kinds`` (all
    registered kinds by default), seeded by ``seed``. A corruption that leaves a document unchanged (one line to
    shuffle, say) is drawn again with another kind, so every document marked corrupted differs from its original."""

    def __init__(self, rate: float = 0.2, kinds: list[str] | None = None, seed: int = 0):
        if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise DataConfigError(f"noise.rate={rate!r}; give the fraction of documents to corrupt, in [0, 1)")
        self.kinds = list(kinds) if kinds else list(CORRUPTIONS)
        unknown = [k for k in self.kinds if k not in CORRUPTIONS]
        if unknown:
            raise DataConfigError(f"noise.kinds: unknown corruption(s) {unknown}; choose from {', '.join(CORRUPTIONS)}")
        self.rate, self.seed = float(rate), seed

    def __call__(self, docs: list) -> tuple[list, np.ndarray, list[str]]:
        """The documents (``corpus.Document``) with ``rate`` of them corrupted, the mask of those, and each one's kind
        ('' when clean)."""
        rng = np.random.default_rng(self.seed)
        chosen = rng.choice(len(docs), int(round(self.rate * len(docs))), replace=False)
        out, kinds = list(docs), [""] * len(docs)
        mask = np.zeros(len(docs), dtype=bool)
        for n in sorted(chosen.tolist()):
            text = docs[n].text
            for kind in rng.permutation(self.kinds):
                changed = CORRUPTIONS[kind](text, rng)
                if changed != text:
                    out[n], kinds[n], mask[n] = dataclasses.replace(docs[n], text=changed), str(kind), True
                    break
        return out, mask, kinds


def corrupted_twins(docs: list, seed: int, kinds: list[str] | None = None) -> tuple[list, list, list[str]]:
    """Canary documents: each of ``docs`` corrupted, the kinds (all registered kinds by default) taken in turn so that
    no one kind decides, and their clean twins (the originals); a kind that leaves a document unchanged passes it to
    the next, and a document no kind changes is left out with its twin. Returns the corrupted ones, their twins and
    each one's kind."""
    rng = np.random.default_rng(seed)
    kinds = list(kinds or CORRUPTIONS)
    corrupted, twins, said = [], [], []
    for n, doc in enumerate(docs):
        turn = n % len(kinds)
        for kind in kinds[turn:] + kinds[:turn]:
            changed = CORRUPTIONS[kind](doc.text, rng)
            if changed != doc.text:
                corrupted.append(dataclasses.replace(doc, text=changed))
                twins.append(doc)
                said.append(kind)
                break
    return corrupted, twins, said
