"""A text corpus as documents for a language model, offline: the Python standard library's source (every install carries
about 30 MB of it), a folder of text files, or a JSONL file with a ``text`` field (the usual format of LM corpora).

A source's ``load()`` gives ``(name, text)`` pairs in a fixed order; ``documents`` cuts them into documents (whole
files, or fixed windows of ``length + 1`` tokens) and a tokenizer makes them token ids: by default bytes (byte b is
token b, a vocabulary of 256 with no download and no training), or a byte-level BPE trained on the corpus itself
(``BPETokenizer``, offline). A document of ``length + 1`` tokens gives the model its first ``length`` tokens as input
and the last ``length`` as targets; a shorter one (``unit="file"``, or a window whose text tokenizes shorter after
corruption) is padded, its padded targets ``IGNORE`` (left out of the loss).

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

import numpy as np
import pytorch_lightning as pl
import torch

from pmp_lightning.data.images import IndexedDataset, PoolDataModule
from pmp_lightning.errors import DataConfigError
from pmp_lightning.training import IGNORE

VOCAB_SIZE = 256  # the byte-level tokenizer: byte b is token b


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


class CorpusDataModule(pl.LightningDataModule):
    """A corpus as the pool, the target set defining J, a test set and the training set, split by file so that no
    file's windows fall into two of them: files in a random order (``split_seed``) are dealt out to the test set, the
    target set, the pool and (``pool_mode="holdout"``) the clean training set, each drawing its documents at random
    from the files it was dealt. A ``noise`` (``Corruption``) corrupts a fraction of the pool, the ground truth that
    detection is measured against; the target and test sets stay clean.

    ``pool_mode="train"``: the language model trains on the pool, corrupted documents included, and scores it;
    ``"holdout"``: it trains on ``train_size`` clean documents (None: as many as the pool holds) and scores a pool it
    never saw. ``downstream``: a source
    of your own for the target set (a ``FolderSource`` or ``JsonlSource``), which must share no document with the pool.
    """

    def __init__(self, source, noise, unit: str = "window", length: int = 128, pool_mode: str = "train",
                 pool_size: int = 2000, train_size: int | None = None, downstream_size: int = 200, test_size: int = 200,
                 downstream=None, batch_size: int = 32, split_seed: int = 0, num_workers: int = 0, canaries: int = 0,
                 downstream_includes_pool: bool = False, tokenizer=None, wide_size: int | None = None):
        super().__init__()
        if pool_mode not in ("train", "holdout") or downstream_includes_pool:
            raise DataConfigError(f"pool={pool_mode} does not apply to a corpus; use pool=train or pool=holdout")
        if pool_mode == "train" and train_size is not None:
            raise DataConfigError("data.train_size does not apply to pool=train, where the pool is the training set")
        if canaries:
            raise DataConfigError("scoring.canaries holds out labelled examples with a wrong label; a corpus has no labels: "
                                  "set scoring.canaries=0")
        self.source, self.noise, self.unit, self.length = source, noise, unit, length
        self.pool_mode, self.pool_size, self.train_size = pool_mode, pool_size, train_size
        self.downstream_size, self.test_size, self.trusted = downstream_size, test_size, downstream
        self.batch_size, self.split_seed, self.num_workers = batch_size, split_seed, num_workers
        if wide_size is not None and (isinstance(wide_size, bool) or not isinstance(wide_size, int) or wide_size < 1):
            raise DataConfigError(f"data.wide_size={wide_size!r}: give the number of documents of the wide slice the "
                                  f"data scorer scores (e.g. 6000), or null for none")
        self.wide_size, self.wide = wide_size, None
        self.tokenizer = tokenizer or ByteTokenizer()
        self.num_classes = self.vocab_size = VOCAB_SIZE  # the tokenizer's vocabulary, once it is trained (setup)
        self.canary_mask, self.known_errors, self.known_error_counts = None, None, None
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        texts = self.source.load()
        self.num_classes = self.vocab_size = self.tokenizer.fit([text for _, text in texts]).vocab_size
        documents([max(texts, key=lambda t: len(t[1]))], self.unit, self.length, self.tokenizer)  # a window fits at all
        files = [texts[i] for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.split_seed))]
        gen = torch.Generator().manual_seed(self.split_seed + 1)
        wanted = [("test set (data.test_size)", self.test_size),
                  *([] if self.trusted is not None else [("target set (data.downstream_size)", self.downstream_size)]),
                  ("pool (data.pool_size)", self.pool_size),
                  *([("clean training set (data.train_size)", self.train_size or self.pool_size)]
                    if self.pool_mode == "holdout" else []),
                  *([("wide slice (data.wide_size)", self.wide_size)] if self.wide_size else [])]
        dealt = dict(zip((what for what, _ in wanted), self._deal(files, wanted, gen)))
        test, pool = dealt["test set (data.test_size)"], dealt["pool (data.pool_size)"]
        target = (dealt["target set (data.downstream_size)"] if self.trusted is None
                  else documents(self.trusted.load(), self.unit, self.length, self.tokenizer))
        corrupted, self.corrupted_mask, self.corruption_kind = self.noise(pool)
        self.pool_documents, self.target_documents = corrupted, target
        self.pool_index = np.arange(len(pool))
        tokens = lambda docs: IndexedDataset(*tokenize(docs, self.length, self.tokenizer))  # noqa: E731
        self.pool = tokens(corrupted)
        self.scored = self.pool
        self.downstream = tokens(target)
        self.test_set = tokens(test)
        self.train_set = self.pool if self.pool_mode == "train" else tokens(dealt["clean training set (data.train_size)"])
        if self.wide_size:  # documents the proxy never saw, corrupted as the pool is: the data scorer's (scores/scorer.py)
            self.wide_documents, self.wide_mask, _ = self.noise(dealt["wide slice (data.wide_size)"])
            self.wide = tokens(self.wide_documents)
        shared = len({d.text for d in target} & {d.text for d in pool})
        if shared:
            raise DataConfigError(f"the target set (data.downstream) shares {shared} documents with the pool: J must not "
                                  f"contain documents it scores; remove them from the target set")
        self.downstream_note = {"source": self.trusted.describe() if self.trusted is not None else
                                f"files of {self.source.describe()} beside the pool's", "size": len(target)}
        self._ready = True

    def _deal(self, files, wanted, gen) -> list[list[Document]]:
        """Each split's documents: files dealt in turn until the split has four times the documents it needs (all
        that remain for a split of size None), then that many drawn from them at random, in corpus order. A document
        whose text an earlier split already holds (a licence header, a copied module) is not dealt again, so no text
        is in two splits (J never holds a document it scores, the test set none the model trained on)."""
        out, at, taken = [], 0, set()
        for what, size in wanted:
            candidates = []
            while at < len(files) and (size is None or len(candidates) < 4 * size):
                name, text = files[at]
                dealt = (_windows(name, text, self.length + 1, self.tokenizer) if self.unit == "window"
                         else documents([files[at]], "file", self.length) if len(text) > 1 else [])
                candidates += [doc for doc in dealt if doc.text not in taken]
                at += 1
            size = len(candidates) if size is None else size
            if size < 1 or len(candidates) < size:
                raise DataConfigError(f"the {what} needs {size} documents but the corpus ({self.source.describe()}) has only "
                                      f"{len(candidates)} left after the earlier splits; lower the sizes or give a larger "
                                      f"corpus")
            keep = torch.randperm(len(candidates), generator=gen)[:size].sort().values
            out.append([candidates[i] for i in keep.tolist()])
            taken.update(doc.text for doc in out[-1])
        return out

    @property
    def is_mislabeled(self) -> np.ndarray:
        """The ground truth detection is measured against: the corrupted documents."""
        return self.corrupted_mask

    def ground_truth(self) -> dict[str, np.ndarray]:
        return {"index": self.pool_index, "is_mislabeled": self.corrupted_mask,
                "corruption": np.array(self.corruption_kind, dtype=str)}

    def pool_columns(self) -> dict[str, list]:
        """What scores.csv says of each pool document before its scores."""
        return {"index": self.pool_index.tolist(), "document": [d.name for d in self.pool_documents],
                "corruption": self.corruption_kind, "is_mislabeled": self.corrupted_mask.astype(int).tolist()}

    def suspect_columns(self, predicted=None) -> dict[str, list]:
        """What suspects.csv says of each pool document: where it comes from and its first line."""
        return {"index": self.pool_index.tolist(), "document": [d.name for d in self.pool_documents],
                "first_line": [first_line(d.text) for d in self.pool_documents]}

    # the cache keys by content and the loaders, as the image pools have them (they read the same attributes)
    content_key = PoolDataModule.content_key
    downstream_key = PoolDataModule.downstream_key
    _loader = PoolDataModule._loader
    train_dataloader = PoolDataModule.train_dataloader
    test_dataloader = PoolDataModule.test_dataloader


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
        from pmp_lightning.data.images import Images

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
