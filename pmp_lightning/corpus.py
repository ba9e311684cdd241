"""A text corpus as documents for a language model, offline: the Python standard library's source (every install carries
about 30 MB of it), a folder of text files, or a JSONL file with a ``text`` field (the usual format of LM corpora).

A source's ``load()`` gives ``(name, text)`` pairs in a fixed order; ``documents`` cuts them into documents (whole
files, or fixed windows of ``length + 1`` bytes) and the byte-level tokenizer makes them token ids: byte b is token b,
so the vocabulary is 256 with no download and no training. A document of ``length + 1`` tokens gives the model its
first ``length`` tokens as input and the last ``length`` as targets; a shorter file (``unit="file"``) is padded, its
padded targets ``IGNORE`` (left out of the loss).

Every failure of the input is named here, before anything is trained: an empty folder, a JSONL line without ``text``,
binary files, documents shorter than one window.
"""
from __future__ import annotations

import json
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pmp_lightning.errors import DataConfigError
from pmp_lightning.training import IGNORE

VOCAB_SIZE = 256  # the byte-level tokenizer: byte b is token b


@dataclass(frozen=True)
class Document:
    """One document: where it comes from (``name``: the file, and the window's byte offset) and its bytes."""

    name: str
    text: bytes


def _decoded(name: str, raw: bytes) -> bytes | None:
    """The file's bytes when they are text (UTF-8 without NUL bytes), else None: a binary file."""
    if b"\0" in raw:
        return None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw


def _read_files(root: Path, files: list[Path], what: str) -> list[tuple[str, bytes]]:
    """(name relative to ``root``, bytes) of the text files among ``files``; binary ones are skipped, with a word."""
    texts, binary = [], []
    for path in files:
        name = path.relative_to(root).as_posix()
        raw = _decoded(name, path.read_bytes())
        (binary.append(name) if raw is None else texts.append((name, raw)))
    if binary:
        warnings.warn(f"{what}: {len(binary)} of {len(files)} files are not UTF-8 text (NUL bytes or invalid UTF-8) and "
                      f"are skipped, e.g. {', '.join(binary[:3])}", stacklevel=3)
    if not texts:
        raise DataConfigError(f"{what}: none of its {len(files)} files is text (all hold NUL bytes or invalid UTF-8); "
                              f"give a folder of text files")
    return texts


class StdlibSource:
    """The Python standard library's ``.py`` files (site-packages left out), found through ``sysconfig``: a real
    corpus of many authors' code, tests and docstrings on every machine. It differs between Python versions, so the
    results name the version (``describe``). ``packages``: keep only these top-level packages or modules."""

    def __init__(self, packages: list[str] | None = None):
        self.packages = list(packages) if packages else None
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def describe(self) -> str:
        return f"the Python {sys.version.split()[0]} standard library ({self.root})"

    def load(self) -> list[tuple[str, bytes]]:
        files = sorted(p for p in self.root.rglob("*.py")
                       if not {"site-packages", "dist-packages"} & set(p.relative_to(self.root).parts))
        if self.packages is not None:
            files = [p for p in files if top_level(p.relative_to(self.root).as_posix()) in self.packages]
            if not files:
                raise DataConfigError(f"data.source.packages={self.packages}: no such package in {self.describe()}; "
                                      f"name top-level packages or modules, e.g. [email, json]")
        return _read_files(self.root, files, self.describe())


def top_level(name: str) -> str:
    """The top-level package or module a file belongs to: ``email/mime/text.py`` -> ``email``, ``json.py`` -> ``json``."""
    first = name.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") and "/" not in name else first


class FolderSource:
    """Your own corpus: every file under ``path`` whose name ends in one of ``suffixes`` (all files when empty)."""

    def __init__(self, path: str, suffixes: list[str] | None = None):
        self.path, self.suffixes = Path(path), list(suffixes or [])

    def describe(self) -> str:
        return f"the folder {self.path}"

    def load(self) -> list[tuple[str, bytes]]:
        if not self.path.is_dir():
            raise DataConfigError(f"data.source.path={str(self.path)!r} is not a folder; give a folder of text files "
                                  f"(or a .jsonl file with data=corpus_jsonl)")
        files = sorted(p for p in self.path.rglob("*")
                       if p.is_file() and (not self.suffixes or p.name.endswith(tuple(self.suffixes))))
        if not files:
            which = f" ending in {', '.join(self.suffixes)}" if self.suffixes else ""
            raise DataConfigError(f"data.source.path={str(self.path)!r} holds no files{which}: the corpus is empty; "
                                  f"point it at a folder of text files (data.source.suffixes chooses which)")
        return _read_files(self.path, files, f"data.source.path={str(self.path)!r}")


class JsonlSource:
    """Your own corpus as a JSONL file: one JSON object per line, its text under ``field``."""

    def __init__(self, path: str, field: str = "text"):
        self.path, self.field = Path(path), field

    def describe(self) -> str:
        return f"the JSONL file {self.path}"

    def load(self) -> list[tuple[str, bytes]]:
        if not self.path.is_file():
            raise DataConfigError(f"data.source.path={str(self.path)!r}: no such file; give a JSONL file, one "
                                  f"{{\"{self.field}\": ...}} object per line")
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataConfigError(f"{self.path} is not UTF-8 text (byte {e.start}); a JSONL corpus is UTF-8") from None
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataConfigError(f"{self.path}, line {number}: not JSON ({e.msg}); each line must be one JSON "
                                      f"object") from None
            text = record.get(self.field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataConfigError(f"{self.path}, line {number}: no string field {self.field!r} (found "
                                      f"{sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                                      f"every line needs one, or set data.source.field to the field that holds the text")
            if "\0" in text:
                raise DataConfigError(f"{self.path}, line {number}: the text holds NUL bytes; a corpus is text")
            texts.append((f"line {number}", text.encode("utf-8")))
        if not texts:
            raise DataConfigError(f"{self.path} holds no documents (no non-empty line); the corpus is empty")
        return texts


def documents(texts: list[tuple[str, bytes]], unit: str = "window", length: int = 128) -> list[Document]:
    """The corpus cut into documents of ``length + 1`` bytes at most: ``unit="window"`` cuts every text into
    consecutive non-overlapping windows of exactly that size (a text's rest shorter than a window is dropped);
    ``unit="file"`` keeps each text as one document, cut to that size. Deterministic: the texts' order, then offsets."""
    if unit not in ("window", "file"):
        raise DataConfigError(f"data.unit={unit!r}; use window (fixed windows of data.length tokens) or file")
    if not isinstance(length, int) or length < 1:
        raise DataConfigError(f"data.length={length!r}; give the number of tokens a document trains on, e.g. 128")
    size = length + 1
    if unit == "file":
        docs = [Document(name, text[:size]) for name, text in texts if len(text) >= 2]
        short = len(texts) - len(docs)
        if not docs:
            raise DataConfigError(f"every one of the {len(texts)} texts is shorter than 2 bytes: no next-token target")
        if short:
            warnings.warn(f"{short} texts shorter than 2 bytes are skipped (no next-token target)", stacklevel=2)
        return docs
    docs = [Document(f"{name}@{start}", text[start:start + size])
            for name, text in texts for start in range(0, len(text) - size + 1, size)]
    if not docs:
        longest = max(len(t) for _, t in texts)
        raise DataConfigError(f"no text is as long as one window of data.length + 1 = {size} bytes (the longest holds "
                              f"{longest}): lower data.length, or use data.unit=file")
    return docs


def tokenize(docs: list[Document], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (N, length) of the byte-level tokenizer: x = tokens[:-1], y = tokens[1:]; a shorter document
    is padded (inputs 0, a byte no text holds; targets ``IGNORE``)."""
    x = torch.zeros(len(docs), length, dtype=torch.long)
    y = torch.full((len(docs), length), IGNORE, dtype=torch.long)
    for n, doc in enumerate(docs):
        ids = torch.frombuffer(bytearray(doc.text), dtype=torch.uint8).long()
        x[n, : len(ids) - 1] = ids[:-1]
        y[n, : len(ids) - 1] = ids[1:]
    return x, y
