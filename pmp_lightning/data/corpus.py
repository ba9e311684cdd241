"""A text corpus as documents for a language model, offline: the Python standard library's source (every install carries
about 30 MB of it), a folder of text files, or a JSONL file with a ``text`` field (the usual format of LM corpora).

A source's ``load()`` gives ``(name, text)`` pairs in a fixed order; ``documents`` cuts them into documents (whole
files, or fixed windows of ``length + 1`` tokens) and a tokenizer makes them token ids: by default bytes (byte b is
token b, a vocabulary of 256 with no download and no training), or a byte-level BPE trained on the corpus itself
(``BPETokenizer``, offline). A document of ``length + 1`` tokens gives the model its first ``length`` tokens as input
and the last ``length`` as targets; a shorter one (``unit="file"``, or a window whose text tokenizes shorter after
corruption) is padded, its padded targets ``IGNORE`` (left out of the loss).

Every failure of the input is named here, before anything is trained: an empty folder, a JSONL line without ``text``
or not UTF-8 (by its line), binary files, documents shorter than one window, a target or test set sharing documents
with the pool (by name); and what is not a failure is said: where every file or line went, what was dropped and why,
and texts that occur more than once.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
import sysconfig
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pmp_lightning.data.base import IndexedDataset, TaskDataModule
from pmp_lightning.data.corruption import Corruption, corrupted_twins
from pmp_lightning.errors import DataConfigError
from pmp_lightning.task import IGNORE, LANGUAGE_MODEL

VOCAB_SIZE = 256  # the byte-level tokenizer: byte b is token b
EXAMPLES = 3  # names given in a message that lists some of many
log = logging.getLogger(__name__)


class ByteTokenizer:
    """Bytes as tokens: byte b is token b (a vocabulary of 256: no training, every text covered)."""

    vocab_size = VOCAB_SIZE

    def fit(self, texts: list[bytes]) -> "ByteTokenizer":
        return self

    def encode(self, text: bytes) -> list[int]:
        return list(text)

    def count(self, text: bytes) -> int:
        return len(text)

    def spans(self, text: bytes, size: int) -> list[tuple[int, int]]:
        """Byte offsets of the text's consecutive windows of ``size`` tokens (a shorter rest dropped)."""
        return [(start, start + size) for start in range(0, len(text) - size + 1, size)]

    def describe(self) -> str:
        return "bytes"


class BPETokenizer:
    """A byte-level BPE (GPT-2's kind: every text covered, no unknown token) trained on the corpus's own texts with
    the ``tokenizers`` package, offline and deterministic, up to ``vocab_size`` tokens (fewer when the corpus has
    fewer merges to make). Its vocabulary is the language model's (``model.vocab_size`` null takes it). It is trained
    on every file of the source before the splits are drawn (it reads no label and no corruption)."""

    def __init__(self, vocab_size: int = 1024, min_frequency: int = 2):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
            raise DataConfigError(f"data.tokenizer.vocab_size={vocab_size!r}: a byte-level BPE holds the 256 bytes and its "
                                  f"merges; give more than 256, e.g. 1024")
        self.wanted, self.min_frequency = vocab_size, min_frequency
        self._bpe = None

    def fit(self, texts: list[bytes]) -> "BPETokenizer":
        from tokenizers import ByteLevelBPETokenizer

        self._bpe = ByteLevelBPETokenizer()
        self._bpe.train_from_iterator([t.decode("utf-8") for t in texts], vocab_size=self.wanted,
                                      min_frequency=self.min_frequency, show_progress=False)
        return self

    @property
    def vocab_size(self) -> int:
        if self._bpe is None:
            raise RuntimeError("the BPE is trained on the corpus first (fit)")
        return self._bpe.get_vocab_size()

    def encode(self, text: bytes) -> list[int]:
        return self._bpe.encode(text.decode("utf-8", errors="replace")).ids

    def count(self, text: bytes) -> int:
        return len(self.encode(text))

    def spans(self, text: bytes, size: int) -> list[tuple[int, int]]:
        """Byte offsets of the text's consecutive windows of ``size`` tokens (a shorter rest dropped)."""
        decoded = text.decode("utf-8")
        offsets = self._bpe.encode(decoded).offsets
        starts = range(0, len(offsets) - size + 1, size)
        byte = lambda char: len(decoded[:char].encode("utf-8"))  # noqa: E731 - offsets count characters
        return [(byte(offsets[s][0]), byte(offsets[s + size - 1][1])) for s in starts]

    def describe(self) -> str:
        return f"byte-level BPE of {self.vocab_size if self._bpe else self.wanted} tokens, trained on the corpus"


@dataclass(frozen=True)
class Document:
    """One document: where it comes from (``name``: the file, and the window's byte offset) and its bytes."""

    name: str
    text: bytes


def _decoded(raw: bytes) -> bytes | None:
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
        raw = _decoded(path.read_bytes())
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

    item = "file"  # what one (name, text) pair of load() is, in messages

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

    item = "file"

    def __init__(self, path: str, suffixes: list[str] | None = None):
        self.path, self.suffixes = Path(path), list(suffixes or [])

    def describe(self) -> str:
        return f"the folder {self.path}"

    def load(self) -> list[tuple[str, bytes]]:
        if not self.path.is_dir():
            raise DataConfigError(f"{str(self.path)!r} is not a folder; give a folder of text files (or a .jsonl file "
                                  f"with data=jsonl)")
        files = sorted(p for p in self.path.rglob("*")
                       if p.is_file() and (not self.suffixes or p.name.endswith(tuple(self.suffixes))))
        if not files:
            which = f" ending in {', '.join(self.suffixes)}" if self.suffixes else ""
            raise DataConfigError(f"{str(self.path)!r} holds no files{which}: the corpus is empty; point data.path at a "
                                  f"folder of text files (data.source.suffixes chooses which)")
        return _read_files(self.path, files, self.describe())


class JsonlSource:
    """Your own corpus as a JSONL file: one JSON object per line, its text under ``field``. Documents are named by
    their line (``line 12``), counted from 1 in the file as an editor shows it (only a newline ends a line)."""

    item = "line"

    def __init__(self, path: str, field: str = "text"):
        self.path, self.field = Path(path), field

    def describe(self) -> str:
        return f"the JSONL file {self.path}"

    def load(self) -> list[tuple[str, bytes]]:
        if not self.path.is_file():
            raise DataConfigError(f"{str(self.path)!r}: no such file; give a JSONL file, one "
                                  f"{{\"{self.field}\": ...}} object per line")
        raw = self.path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            raise DataConfigError(f"{self.path}, line {line}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                                  f"{column}, byte {e.start} of the file); a JSONL corpus is UTF-8: re-encode the file "
                                  f"(e.g. iconv -f latin1 -t utf-8) or fix that line") from None
        texts = []
        for number, line in enumerate(raw.split(b"\n"), start=1):  # str.splitlines would also split at U+2028 & co.
            line = line.rstrip(b"\r").decode("utf-8")
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


def source_at(where, setting: str, like=None):
    """The source a setting names: a source object as it is (a node with ``_target_``), or a path a user gives
    (``data.downstream=/my/target.jsonl``, ``data.test=/my/test``): a folder is read as a ``FolderSource``, a file as
    a ``JsonlSource``, each with the pool's own source's settings (``suffixes``, ``field``) when it is of that kind, so
    the target and test sets are read as the pool is."""
    if hasattr(where, "load"):
        return where
    if not isinstance(where, (str, Path)):
        raise DataConfigError(f"{setting}={where!r}: give the path of a JSONL file or of a folder of text files")
    path = Path(where)
    if path.is_dir():
        return FolderSource(str(path), like.suffixes if isinstance(like, FolderSource) else None)
    if path.is_file():
        return JsonlSource(str(path), like.field if isinstance(like, JsonlSource) else "text")
    raise DataConfigError(f"{setting}={str(where)!r}: no such file or folder (resolved to {path.resolve()}); give a JSONL "
                          f"file (one {{\"text\": ...}} object per line) or a folder of text files")


def pool_source(source, path):
    """The pool's source: ``source`` itself (``data=code``), or for ``data=jsonl`` and ``data=folder``, whose configs
    give a partial source, that source reading ``path`` (``data.path``, the one setting a user must give)."""
    if isinstance(source, functools.partial):
        example = "/my/texts" if source.func is FolderSource else "/my/corpus.jsonl"
        if path is None and "path" not in source.keywords:
            raise DataConfigError(f"data.path is not set: it is your corpus ({source.func.__name__}), e.g. "
                                  f"data.path={example}")
        return source(**({} if path is None else {"path": str(path)}))
    if path is not None:
        raise DataConfigError(f"data.path={str(path)!r}: this data's source ({type(source).__name__}) does not read a "
                              f"path; for a corpus of your own use data=jsonl or data=folder with data.path")
    return source


def documents(texts: list[tuple[str, bytes]], unit: str = "window", length: int = 128,
              tokenizer=None) -> list[Document]:
    """The corpus cut into documents of ``length + 1`` tokens at most (bytes, unless ``tokenizer`` says otherwise):
    ``unit="window"`` cuts every text into consecutive non-overlapping windows of exactly that many tokens (a text's
    rest shorter than a window is dropped); ``unit="file"`` keeps each text as one document, cut to that size.
    Deterministic: the texts' order, then offsets."""
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
    tokenizer = tokenizer or ByteTokenizer()
    docs = [doc for name, text in texts for doc in _windows(name, text, size, tokenizer)]
    if not docs:
        longest = max(tokenizer.count(t) for _, t in texts)
        raise DataConfigError(f"no text is as long as one window of data.length + 1 = {size} tokens (the longest holds "
                              f"{longest}): lower data.length, or use data.unit=file")
    return docs


def _windows(name: str, text: bytes, size: int, tokenizer) -> list[Document]:
    """The text's consecutive windows of ``size`` tokens, named by their byte offset (none when it is shorter)."""
    return [Document(f"{name}@{start}", text[start:stop]) for start, stop in tokenizer.spans(text, size)]


def tokenize(docs: list[Document], length: int, tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (N, length) of the tokenizer (bytes by default): x = tokens[:-1], y = tokens[1:] of the first
    ``length + 1`` tokens; a shorter document is padded (inputs 0, targets ``IGNORE``)."""
    tokenizer = tokenizer or ByteTokenizer()
    x = torch.zeros(len(docs), length, dtype=torch.long)
    y = torch.full((len(docs), length), IGNORE, dtype=torch.long)
    for n, doc in enumerate(docs):
        ids = torch.tensor(tokenizer.encode(doc.text)[:length + 1], dtype=torch.long)
        if len(ids) < 2:
            continue
        x[n, : len(ids) - 1] = ids[:-1]
        y[n, : len(ids) - 1] = ids[1:]
    return x, y


TEST, TARGET, CANARY, POOL, TRAIN, WIDE = ("test set", "target set", "canaries", "pool", "training set",
                                          "wide slice")
SIZE_SETTING = {TEST: "data.test_size", TARGET: "data.downstream_size", CANARY: "scoring.canaries",
                POOL: "data.pool_size", TRAIN: "data.train_size", WIDE: "data.wide_size"}


@dataclass
class Account:
    """Where every text (file, or line of a JSONL file) of one source went: the split it was dealt to, or why none;
    and the documents of dealt texts that no split took. The run logs it in one line (``line``) and writes each text's
    fate into ``ground_truth.npz`` (``fates``), so that nothing of a user's corpus is lost without a word."""

    source: object
    names: list[str]  # every text of the source, in its order
    use: dict[str, str]  # text -> the split it was dealt to
    short: list[str]  # texts without one document: shorter than one window
    repeated: list[str]  # texts whose every document an earlier split already holds
    undealt: list[str]  # texts left when every split was full
    documents: dict[str, int]  # split -> its documents
    capped: int = 0  # documents of dealt texts beyond data.max_per_file
    surplus: int = 0  # documents of the text that filled a split, beyond the split's size
    repeats: int = 0  # documents not dealt again: an earlier split holds their text
    copies: list[list[str]] = field(default_factory=list)  # texts that occur more than once among the dealt ones

    def fates(self) -> list[str]:
        """Each text's fate, in the source's order: its split, or why it is in none."""
        why = {**{n: "dropped: shorter than one window" for n in self.short},
               **{n: "dropped: an earlier split holds its text" for n in self.repeated},
               **{n: "not dealt: the splits were full" for n in self.undealt}}
        return [self.use.get(n) or why[n] for n in self.names]

    def line(self, unit_note: str, full: str) -> str:
        """One clause of the split's log line: this source's texts, each split's share, and what was dropped."""
        item, per = getattr(self.source, "item", "file"), {split: 0 for split in self.documents}
        for split in self.use.values():
            per[split] += 1
        shares = ", ".join(f"{split} {_n(n, 'document')} from {_n(per[split], item)}"
                           for split, n in self.documents.items())
        dropped = [f"{_n(len(self.short), item)} shorter than {unit_note} ({_some(self.short)})" if self.short else "",
                   f"{_n(len(self.repeated), item)} whose text an earlier split holds ({_some(self.repeated)})"
                   if self.repeated else "",
                   f"{_n(self.repeats, 'document')} whose text an earlier split holds" if self.repeats else "",
                   f"{_n(self.capped, 'document')} beyond data.max_per_file of their {item}" if self.capped else "",
                   f"{_n(self.surplus, 'document')} of the {item}s that filled a split, beyond its size"
                   if self.surplus else "",
                   f"{_n(len(self.undealt), item)} not dealt ({full})" if self.undealt else ""]
        dropped = [d for d in dropped if d]
        return (f"{self.source.describe()}, {_n(len(self.names), item)}: {shares}; "
                + (f"dropped {'; '.join(dropped)}" if dropped else "nothing dropped"))


def _n(count: int, word: str) -> str:
    """``1 line``, ``2 lines``."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def _some(names: list[str]) -> str:
    """A few of many names, for a message."""
    return ", ".join(names[:EXAMPLES]) + (", …" if len(names) > EXAMPLES else "")


def _drawn(docs: list[Document], keep: int, gen: torch.Generator) -> list[Document]:
    """``keep`` of the documents, drawn at random, in their order (all of them when ``keep`` is their number)."""
    if keep == len(docs):
        return docs
    return [docs[i] for i in torch.randperm(len(docs), generator=gen)[:keep].sort().values.tolist()]


def _copies(texts: list[tuple[str, bytes]]) -> list[list[str]]:
    """The names of the texts that occur more than once, one list per repeated text, in the source's order."""
    names = defaultdict(list)
    for name, text in texts:
        names[text].append(name)
    return [group for group in names.values() if len(group) > 1]


def _copies_warning(account: Account) -> str:
    """A source's texts that occur more than once, a few of them by name, and what the splits do with them."""
    copies, item = account.copies, getattr(account.source, "item", "file")
    named = "; ".join(" = ".join(c[:EXAMPLES]) + (" = …" if len(c) > EXAMPLES else "") for c in copies[:EXAMPLES])
    return (f"{account.source.describe()}: {sum(len(c) - 1 for c in copies)} {item}s repeat another's text exactly "
            f"({len(copies)} texts occur more than once: {named}{' …' if len(copies) > EXAMPLES else ''}); copies dealt "
            f"to one split count once each, a copy in a later split is dropped; remove the copies if each text should "
            f"count once")


def _refuse_shared(docs: list[Document], others: list[Document], what: str, where: str, fix: str) -> None:
    """Refuse ``docs`` sharing a document with ``others``, naming a few of them on both sides."""
    theirs = {doc.text: doc.name for doc in others}
    shared = [f"{doc.name} = {where}'s {theirs[doc.text]}" for doc in docs if doc.text in theirs]
    if shared:
        raise DataConfigError(f"{what} shares {len(shared)} documents with {where} ({_some(shared)}); {fix}")


def _corruption(noise):
    """What corrupts a corpus's pool: a ``Corruption`` (noise=corrupt: the ground truth detection is measured
    against), or None for ``noise=none`` (a ``LabelNoise`` of kind none: the corpus as it is, real-data mode). Label
    noise flips class labels, which a corpus does not have."""
    if noise is None or isinstance(noise, Corruption):
        return noise
    if getattr(noise, "kind", None) == "none":
        return None
    raise DataConfigError(f"noise={getattr(noise, 'kind', type(noise).__name__)} changes class labels, and a corpus has "
                          f"none: use noise=corrupt (documents corrupted on purpose, the ground truth detection is "
                          f"measured against) or noise=none (your corpus as it is)")


class CorpusDataModule(TaskDataModule):
    """A corpus as the pool, the target set defining J, a test set and the training set, split by file (by line of a
    JSONL file) so that no file's documents fall into two of them: files in a random order (``split_seed``) are dealt
    out in turn to the test set, the target set, the pool, (``pool_mode="holdout"``) the clean training set and the
    data scorer's wide slice, each split exactly what it uses: files until it has its size (a size None: every file
    left), a file giving at most ``max_per_file`` of its documents, drawn at random (None: all of them), the file that
    fills a split only the ones it needs. A ``noise`` (``Corruption``) corrupts a fraction of the pool, the ground truth
    that detection is measured against; the target and test sets stay clean. ``noise=none`` (a ``LabelNoise`` of kind
    none) leaves the corpus as it is: no ground truth, the pool ranked (real-data mode).

    ``pool_mode="train"``: the language model trains on the pool, corrupted documents included, and scores it;
    ``"holdout"``: it trains on ``train_size`` clean documents (None: as many as the pool holds) and scores a pool it
    never saw. ``path``: the corpus of ``data=jsonl`` and ``data=folder``, whose ``source`` is a partial that reads it
    (``pool_source``). ``downstream``: a target set of your own (a path or a source, ``source_at``), which must share no
    document with the pool; the test set is then held out of it (``test_size`` of its documents, the rest define J),
    so that the models are tested on, and selection measured on, the target's distribution. ``test``: a test set of
    your own instead (a path or a source, all of it), which must share no document with the training set.
    """

    kind = LANGUAGE_MODEL

    def __init__(self, source, noise, unit: str = "window", length: int = 128, pool_mode: str = "train",
                 pool_size: int | None = 2000, train_size: int | None = None, downstream_size: int = 200,
                 test_size: int = 200, downstream=None, batch_size: int = 32, split_seed: int = 0, num_workers: int = 0,
                 canaries: int = 0, downstream_includes_pool: bool = False, tokenizer=None, wide_size: int | None = None,
                 path: str | None = None, test=None, max_per_file: int | None = None):
        super().__init__()
        if pool_mode not in ("train", "holdout") or downstream_includes_pool:
            raise DataConfigError(f"pool={pool_mode} does not apply to a corpus; use pool=train or pool=holdout")
        if pool_mode == "train" and train_size is not None:
            raise DataConfigError("data.train_size does not apply to pool=train, where the pool is the training set")
        if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 0:
            raise DataConfigError(f"scoring.canaries={canaries!r}: give how many target documents to hold out of J as "
                                  f"canaries (an integer ≥ 0)")
        for setting, value in (("data.wide_size", wide_size), ("data.max_per_file", max_per_file)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DataConfigError(f"{setting}={value!r}: give a positive number of documents, or null for "
                                      + ("none" if setting == "data.wide_size" else "no limit"))
        self.source, self.noise, self.unit, self.length = pool_source(source, path), _corruption(noise), unit, length
        self.pool_mode, self.pool_size, self.train_size = pool_mode, pool_size, train_size
        self.downstream_size, self.test_size, self.max_per_file = downstream_size, test_size, max_per_file
        self.trusted = None if downstream is None else source_at(downstream, "data.downstream", self.source)
        self.test_source = None if test is None else source_at(test, "data.test", self.source)
        self.batch_size, self.split_seed, self.num_workers = batch_size, split_seed, num_workers
        self.wide_size, self.wide = wide_size, None
        self.tokenizer = tokenizer or ByteTokenizer()
        self.num_classes = self.vocab_size = VOCAB_SIZE  # the tokenizer's vocabulary, once it is trained (setup)
        self.canaries = canaries
        self.canary_mask, self.known_errors, self.known_error_counts = None, None, None
        self._ready = False

    @property
    def test_from(self) -> str:
        """Where the test set comes from: a file of its own, held out of the target set, or dealt from the corpus."""
        return "file" if self.test_source is not None else "target" if self.trusted is not None else "corpus"

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        texts = self.source.load()
        self.num_classes = self.vocab_size = self.tokenizer.fit([text for _, text in texts]).vocab_size
        documents([max(texts, key=lambda t: len(t[1]))], self.unit, self.length, self.tokenizer)  # a window fits at all
        dealt, accounts = self._deal_all(texts)
        pool, target, test = dealt[POOL], dealt[TARGET], dealt[TEST]
        train = pool if self.pool_mode == "train" else dealt[TRAIN]
        _refuse_shared(target, pool, "the target set (data.downstream)", "the pool",
                       "J must not contain documents it scores: remove them from the target set")
        if self.test_from != "corpus":
            _refuse_shared(test, train, "the test set (" + ("data.test)" if self.test_from == "file" else
                                                            "held out of data.downstream)"), "the training set",
                           "the model would be tested on documents it trained on: remove them from that file")
        corrupted, self.corrupted_mask, self.corruption_kind = self._corrupt(pool)
        self.pool_documents, self.test_documents = corrupted, test
        self.pool_index = np.arange(len(pool))
        tokens = lambda docs: IndexedDataset(*tokenize(docs, self.length, self.tokenizer))  # noqa: E731
        self.pool = tokens(corrupted)
        target = self._hold_out_canaries(target, dealt.get(CANARY), tokens)
        self.target_documents, self.downstream = target, tokens(target)  # J without the canaries' documents
        self.test_set = tokens(test)
        self.train_set = self.scored if self.pool_mode == "train" else tokens(train)
        if self.wide_size:  # documents the proxy never saw, corrupted as the pool is: the data scorer's (scores/scorer.py)
            self.wide_documents, self.wide_mask, self.wide_kinds = self._corrupt(dealt[WIDE])
            self.wide = tokens(self.wide_documents)
        self.accounts = accounts
        self._describe(target, test)
        self._ready = True

    def _hold_out_canaries(self, target: list[Document], dealt: list[Document] | None, tokens) -> list[Document]:
        """``canaries`` documents of J's kind, each corrupted (the kinds in turn: ``corruption.corrupted_twins``) and
        scored beside the pool with its clean twin, the original: a variant that ranks the corrupted ones below their
        twins finds junk, and the run's target documents, not the pool's ground truth, say so (``policy.choose``).
        With J dealt from the corpus they are dealt beside it (``dealt``: files of their own; J keeps its size); a
        target set of your own gives its first ones for them. With pool=train they join the training set, as the
        pool's own documents do. ``scored`` is the pool, then the canaries, then their twins (``canary_mask`` marks
        the canaries among the last two). Returns J's documents."""
        self.scored, self.canary_mask, self.canary_kinds = self.pool, None, []
        k = int(self.canaries)
        if not k:
            return target
        if dealt is None:
            if k > len(target) - 20:
                raise DataConfigError(f"scoring.canaries={k}: that many documents are held out of the target set "
                                      f"({len(target)} documents), and J keeps at least 20; lower it, or give a larger "
                                      f"target set")
            dealt, target = target[:k], target[k:]
        corrupted, twins, self.canary_kinds = corrupted_twins(dealt, self.split_seed + 7919)
        self.canary_mask = np.arange(2 * len(corrupted)) < len(corrupted)
        self.scored = tokens([*self.pool_documents, *corrupted, *twins])
        return target

    def _deal_all(self, texts) -> tuple[dict[str, list[Document]], list[Account]]:
        """Every split's documents, and each source's account: the pool's source deals the test set (unless it comes
        from a file or the target set), the target set (unless it is your own), the pool, the clean training set and
        the wide slice; a target set of your own gives the test set (unless it is a file of its own) and J the rest."""
        wanted = [*([(TEST, self.test_size)] if self.test_from == "corpus" else []),
                  *([(TARGET, self.downstream_size)] if self.trusted is None else []),
                  *([(CANARY, self.canaries)] if self.trusted is None and self.canaries else []),
                  (POOL, self.pool_size),
                  *([(TRAIN, self.train_size or self.pool_size)] if self.pool_mode == "holdout" else []),
                  *([(WIDE, self.wide_size)] if self.wide_size else [])]
        dealt, account = self._deal(texts, wanted, self.source)
        accounts = [account]
        if self.trusted is not None:
            held = [(TEST, self.test_size)] if self.test_from == "target" else []
            own, account = self._deal(self.trusted.load(), [*held, (TARGET, None)], self.trusted, "data.downstream")
            dealt.update(own)
            accounts.append(account)
        if self.test_source is not None:
            own, account = self._deal(self.test_source.load(), [(TEST, None)], self.test_source, "data.test")
            dealt.update(own)
            accounts.append(account)
        return dealt, accounts

    def _deal(self, texts, wanted, source, setting: str | None = None) -> tuple[dict[str, list[Document]], Account]:
        """Each wanted split's documents, in the source's order, and the source's account. The texts, shuffled by
        ``split_seed``, are dealt in turn to each split until it has its size (a size None: every text left); a text
        of the corpus gives the split at most ``max_per_file`` of its documents (a target or test set of your own
        gives all), and the text that fills the split only the ones it needs, drawn at random (the rest are counted
        as dropped). A document whose text an earlier split already
        holds (a licence header, a copied module) is not dealt again, so no text is in two splits (J never holds a
        document it scores, the test set none the model trained on)."""
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        gen = torch.Generator().manual_seed(self.split_seed + 1)
        account = Account(source=source, names=[name for name, _ in texts], use={}, short=[], repeated=[], undealt=[],
                          documents={})
        out, at, taken = {}, 0, set()
        cap = self.max_per_file if source is self.source else None
        for what, size in wanted:
            out[what], at = self._fill(what, size, texts, order, at, taken, account, gen, cap)
            if not out[what] or (size is not None and len(out[what]) < size):
                raise DataConfigError(self._short_of(what, size, len(out[what]), source, setting, wanted))
            account.documents[what] = len(out[what])
            taken.update(doc.text for doc in out[what])
        place = {name: i for i, (name, _) in enumerate(texts)}
        account.undealt = [texts[i][0] for i in sorted(order[at:])]
        account.short.sort(key=place.get)
        account.repeated.sort(key=place.get)
        dealt = set(account.use) | set(account.repeated)
        account.copies = _copies([(name, text) for name, text in texts if name in dealt])
        return out, account

    def _fill(self, what: str, size, texts, order: list[int], at: int, taken: set, account: Account,
              gen: torch.Generator, cap: int | None) -> tuple[list[Document], int]:
        """One split's documents in the source's order, dealt from ``order[at:]`` until it has ``size`` (None: every
        text left), and where the next split starts; what each text gave, or why nothing, goes into ``account``."""
        chunks, got = [], 0  # (the text's place in the source, the documents it gave)
        while at < len(order) and (size is None or got < size):
            name, text = texts[order[at]]
            at += 1
            cut = self._cut(name, text)
            fresh = [doc for doc in cut if doc.text not in taken]
            if not fresh:
                (account.repeated if cut else account.short).append(name)
                continue
            allowed = min(len(fresh), cap or len(fresh))
            kept = _drawn(fresh, min(allowed, len(fresh) if size is None else size - got), gen)
            account.repeats += len(cut) - len(fresh)
            account.capped += len(fresh) - allowed
            account.surplus += allowed - len(kept)
            account.use[name] = what
            chunks.append((order[at - 1], kept))
            got += len(kept)
        return [doc for _, docs in sorted(chunks, key=lambda c: c[0]) for doc in docs], at

    def _cut(self, name: str, text: bytes) -> list[Document]:
        """A text's documents: its windows (``unit="window"``), or the text itself cut to size (``unit="file"``)."""
        if self.unit == "window":
            return _windows(name, text, self.length + 1, self.tokenizer)
        return documents([(name, text)], "file", self.length) if len(text) > 1 else []

    def _short_of(self, what: str, size, got: int, source, setting, wanted) -> str:
        """Why a split could not have its size, and what to change."""
        earlier = [w for w, _ in wanted[:[w for w, _ in wanted].index(what)]]
        where = f"{source.describe()}{f' ({setting})' if setting else ''}"
        if setting == "data.downstream" and what == TEST:
            return (f"the test set ({SIZE_SETTING[TEST]}={size}) is held out of the target set, {where}, which holds only "
                    f"{got} documents; lower {SIZE_SETTING[TEST]} (J keeps the rest) or give a test set of your own "
                    f"(data.test=...)")
        if size is None:
            if not earlier:
                return (f"the {what} from {where} holds no document of one window ({self.length + 1} tokens: data.length "
                        f"+ 1); give a larger set or lower data.length")
            return (f"the {what} from {where} has no document left after the {' and '.join(earlier)}; lower "
                    f"{' and '.join(SIZE_SETTING[w] for w in earlier)}"
                    + (" or give a test set of your own (data.test=...)" if TEST in earlier else " or give a larger set"))
        took_all = [w for w, s in wanted if s is None and w in earlier]
        fix = (f"; {SIZE_SETTING[took_all[0]]}=null deals every document left to the {took_all[0]}: give it a number"
               if took_all else "; lower the sizes or give a larger corpus")
        return (f"the {what} ({SIZE_SETTING[what]}) needs {size} documents but {where} has only {got} left after the "
                f"earlier splits ({', '.join(earlier) or 'none'}){fix}")

    def _corrupt(self, docs: list[Document]) -> tuple[list[Document], np.ndarray, list[str]]:
        """The documents corrupted by the noise, the mask of those and each one's kind; as they are under noise=none,
        where a source that knows its own junk (``known_junk(name)``: ``DomainSource``'s) gives the ground truth."""
        if self.noise is None:
            known = getattr(self.source, "known_junk", lambda name: "")
            kinds = [known(d.name) for d in docs]
            return list(docs), np.array([bool(k) for k in kinds], dtype=bool), kinds
        return self.noise(docs)

    def _describe(self, target: list[Document], test: list[Document]) -> None:
        """Where J's and the test set's documents come from (``downstream_note``, ``test_note``: metrics.json; in
        real-data mode without a target set of your own, a warning that J is as unchecked as the pool), what went
        where (one log line, ``split_note``) and texts that occur more than once (a warning)."""
        self.test_note = {"size": len(test), "source": self._test_source()}
        note = {"source": self.trusted.describe() if self.trusted is not None else
                f"files of {self.source.describe()} beside the pool's", "size": len(target)}
        if self.test_from == "target":
            note["held_out_for_test"] = len(test)
        if self.trusted is None and self.noise is None:
            note["warning"] = (f"J comes from {len(target)} documents of {self.source.describe()}, the same unchecked "
                               f"corpus as the pool: whatever junk it holds is in J too. Give a target set you trust as "
                               f"data.downstream=<a JSONL file or a folder>")
            warnings.warn(note["warning"], stacklevel=3)
        self.downstream_note = note
        unit = f"one window ({self.length + 1} tokens: data.length + 1)" if self.unit == "window" else "2 bytes"
        full = next((f"the splits were full; {SIZE_SETTING[w]}=null deals every one left" for w in (POOL, TRAIN, WIDE)
                     if w in self.accounts[0].documents), "the splits were full")
        training = "the pool is the training set" if self.pool_mode == "train" else "the training set is held out"
        self.split_note = {"line": "; ".join([*(a.line(unit, full) for a in self.accounts), training])}
        log.info(f"corpus splits: {self.split_note['line']}")
        for account in self.accounts:
            if account.copies:
                warnings.warn(_copies_warning(account), stacklevel=3)

    def _test_source(self) -> str:
        """The test documents' origin, after their number: what selection's measure is taken on (``measured_on``)."""
        if self.test_from == "file":
            return f"documents of the test set of your own, {self.test_source.describe()} (data.test)"
        if self.test_from == "target":
            return f"documents held out of J from the target set, {self.trusted.describe()} (data.test_size)"
        return f"documents of {self.source.describe()} dealt beside the target set's (data.test_size)"

    @property
    def is_mislabeled(self) -> np.ndarray:
        """The ground truth detection is measured against: the corrupted documents."""
        return self.corrupted_mask

    def ground_truth(self) -> dict[str, np.ndarray]:
        """What ``ground_truth.npz`` holds: each pool document's corruption, and where every text (file or line) of
        the corpus went (``corpus_text``, ``corpus_fate``: its split, or why it is in none)."""
        corpus = self.accounts[0]
        return {"index": self.pool_index, "is_mislabeled": self.corrupted_mask,
                "corruption": np.array(self.corruption_kind, dtype=str),
                "corpus_text": np.array(corpus.names, dtype=str), "corpus_fate": np.array(corpus.fates(), dtype=str)}

    def pool_columns(self) -> dict[str, list]:
        """What scores.csv says of each pool document before its scores."""
        return {"index": self.pool_index.tolist(), "document": [d.name for d in self.pool_documents],
                "corruption": self.corruption_kind, "is_mislabeled": self.corrupted_mask.astype(int).tolist()}

    def wide_columns(self) -> dict[str, list]:
        """What wide_scores.csv says of each document of the wide slice before its scores, as scores.csv does of the
        pool's (``index``: its place in the slice; ``document``: its file or line and offset)."""
        return {"index": list(range(len(self.wide_documents))), "document": [d.name for d in self.wide_documents],
                "corruption": self.wide_kinds, "is_mislabeled": self.wide_mask.astype(int).tolist()}

    def suspect_columns(self, predicted=None) -> dict[str, list]:
        """What suspects.csv says of each pool document: where it comes from and its first line."""
        return {"index": self.pool_index.tolist(), "document": [d.name for d in self.pool_documents],
                "first_line": [first_line(d.text) for d in self.pool_documents]}


def first_line(text: bytes, width: int = 60) -> str:
    """The document's first non-blank line, at most ``width`` characters: what suspects.csv shows of it."""
    line = next((s for s in text.decode("utf-8", errors="replace").splitlines() if s.strip()), "")
    return line.strip()[:width]


class PackageSource:
    """A labelled text set with no download: windows of ``length`` bytes from ten top-level packages of the standard
    library, each labelled by its package (class k = ``packages[k]``), as token ids for a text classifier. Each
    package's files are split by ``seed`` between the main split and the test split (``test_fraction`` of them, at
    least one), so no file has windows in both; each package gives at most ``per_package`` windows to the main split
    (a fifth of that to the test split), drawn at random, so the classes are about balanced."""

    PACKAGES = ("asyncio", "ctypes", "email", "encodings", "idlelib", "importlib", "multiprocessing", "tkinter",
                "unittest", "xml")

    def __init__(self, packages: list[str] | None = None, length: int = 128, per_package: int = 300,
                 test_fraction: float = 0.2, seed: int = 0):
        self.packages = list(packages or self.PACKAGES)
        self.length, self.per_package, self.test_fraction, self.seed = length, per_package, test_fraction, seed
        self.num_classes = len(self.packages)

    def load(self):
        from pmp_lightning.data.sources import Images

        texts = StdlibSource(self.packages).load()
        gen = torch.Generator().manual_seed(self.seed)
        splits = {"main": ([], []), "test": ([], [])}
        self.files = {"main": [], "test": []}  # the files each split read, by name
        for label, package in enumerate(self.packages):
            files = [t for t in texts if top_level(t[0]) == package]
            if len(files) < 2:
                raise DataConfigError(f"data.source.packages: {package!r} has {len(files)} file(s) in "
                                      f"{StdlibSource().describe()}; a package needs two at least (one per split)")
            order = torch.randperm(len(files), generator=gen).tolist()
            held = max(1, round(self.test_fraction * len(files)))
            for split, chosen, cap in (("test", order[:held], max(1, self.per_package // 5)),
                                       ("main", order[held:], self.per_package)):
                self.files[split] += [files[i][0] for i in sorted(chosen)]
                windows = documents([files[i] for i in sorted(chosen)], "window", self.length - 1)  # length bytes
                keep = torch.randperm(len(windows), generator=gen)[:cap].sort().values.tolist()
                splits[split][0].append(torch.tensor([list(windows[i].text) for i in keep], dtype=torch.long))
                splits[split][1].append(torch.full((len(keep),), label))
        main, test = ((torch.cat(x), torch.cat(y)) for x, y in splits.values())
        return Images.checked(*main, "data.source (PackageSource)"), Images.checked(*test, "data.source (PackageSource)")
