"""A mixed-domain text corpus, offline: a testbed where selection matters. Every Python install carries text of
several kinds; ``DomainSource`` draws files of each, caps each domain's share, and adds junk of known kinds, so a
pool dealt from it mixes documents close to a target domain, far from it, and useless ones, each named by its domain.

Domains (a text's name starts with its domain, ``domain_of`` reads it back):

- ``stdlib/<path>``: the standard library's ``.py`` files (``sysconfig``'s ``stdlib``, site-packages left out),
  without the top-level packages in ``exclude`` (the target set, held out by file: e.g. ``email``, ``json``,
  ``http``). Their tests (``stdlib/test/test_email/...``) stay: near-target code, as real corpora hold it;
- ``site/<path>``: third-party Python code from site-packages (``sysconfig``'s ``purelib`` and ``platlib``: the
  venv's); at most ``per_package`` files of one top-level package, so that no package (torch, say) dominates;
- ``prose/stdlib/<path>``, ``prose/site/<path>``: non-code text: documentation and licence files (``*.txt``,
  ``*.rst``, ``*.md``, ``LICENSE*``, ``LICENCE*``, ``COPYING*``, ``AUTHORS*``, ``NOTICE*``, ``README*``, ``METADATA``
  of the ``*.dist-info`` folders) under site-packages, and the standard library's own text files (the excluded
  packages' left out), whatever exists; also at most ``per_package`` of one top-level folder;
- ``c/<path>``: another language, the C headers of Python's include directory (``sysconfig``'s ``include``);
- ``junk/<kind>/<number>``: ``junk`` texts generated from ``seed``, the kinds in turn (so every kind is present once
  ``junk`` is at least their number), each of about ``junk_bytes`` bytes (0.5 to 1.5 times), all ASCII:

  - ``base64``: a base64 blob of random bytes in lines of 76 characters (an embedded attachment or data URI);
  - ``minified``: one long line of minified-script pieces (``var ``, ``function(``, ``){``, ``return ``, ``===``...)
    from a fixed list and one- or two-letter names, in random order (a minified bundle, as a scraper sees it);
  - ``repeated_line``: one line of words from a fixed word list repeated over the whole text (boilerplate, a stuck
    generator);
  - ``digit_table``: rows of random integers and decimals in fixed-width columns (a data dump);
  - ``word_salad``: sentences of lorem-ipsum words drawn from a fixed word list, in paragraphs (spam, filler);
  - ``shuffled_bytes``: the ASCII bytes of a real standard-library file (drawn from the ``stdlib`` candidates) in
    a random order: code's byte frequencies, no structure (a unigram model cannot tell it from code);
  - ``hex_dump``: ``xxd``-style lines of random bytes (offset, 16 bytes in hex, the printable ones beside them).

Each real domain holds up to ``per_domain`` files (an int for all four, or a mapping ``{domain: files}``, a domain it
does not name holding none), drawn at random (``seed``) from its files of at least ``min_bytes`` bytes in sorted order,
so a load is the same on every call and machine with the same install. Files that are not UTF-8 text are skipped
(``corpus._decoded``, as the other sources do; the next file drawn takes their place, a warning counts them); so is
a text that is an exact copy of an earlier one, or of a file of an excluded package (a vendored copy: J stays held
out). The source's ``seed`` is not the run's: the corpus stays the same across run seeds.
``describe()`` gives the files per domain once loaded.
"""
from __future__ import annotations

import base64
import os
import sys
import sysconfig
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pmp_lightning.data.corpus import _decoded, top_level
from pmp_lightning.errors import DataConfigError

REAL_DOMAINS = ("stdlib", "site", "prose", "c")
DOMAINS = (*REAL_DOMAINS, "junk")
JUNK_KINDS = ("base64", "minified", "repeated_line", "digit_table", "word_salad", "shuffled_bytes", "hex_dump")
PROSE_SUFFIXES = (".txt", ".rst", ".md")
PROSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "AUTHORS", "NOTICE", "README")
SKIPPED_DIRS = {"__pycache__", ".git"}
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
         "magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo "
         "consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint "
         "occaecat cupidatat non proident sunt culpa qui officia deserunt mollit anim id est laborum").split()
MINIFIED = ("var ", "function(", "){", "return ", "}", ";", "=", "+", "-", "*", "&&", "||", "?", ":", "[", "]", ",",
            ".", "this.", "null", "!0", "!1", "0", "1", "(", ")", "new ", "typeof ", "===", "void 0", "\"\"", "if(",
            "else ", "for(", "length", "push(", "prototype.")


def domain_of(name: str, default: str = "other") -> str:
    """The domain of a text or document named by ``DomainSource`` (``site/numpy/core/fromnumeric.py@256`` -> ``site``);
    ``default`` for a name of another source."""
    first = name.split("/", 1)[0]
    return first if first in DOMAINS else default


def junk_kind_of(name: str) -> str | None:
    """The junk kind of a junk text's name (``junk/base64/003@128`` -> ``base64``), None for another domain's."""
    parts = name.split("/")
    return parts[1] if parts[0] == "junk" and len(parts) > 2 else None


def _fit(text: bytes, size: int) -> bytes:
    """``text`` repeated or cut to exactly ``size`` bytes."""
    return (text * (size // max(len(text), 1) + 1))[:size]


def _base64(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    return base64.encodebytes(rng.bytes(size * 3 // 4 + 3))[:size]


def _minified(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out, length = [], 0
    while length < size:
        if rng.random() < 0.3:
            piece = "".join(rng.choice(list(letters), int(rng.integers(1, 3))))
        else:
            piece = MINIFIED[int(rng.integers(len(MINIFIED)))]
        out.append(piece)
        length += len(piece)
    return "".join(out).encode()[:size]


def _repeated_line(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    line = " ".join(rng.choice(WORDS, int(rng.integers(4, 12)))).capitalize() + ".\n"
    return _fit(line.encode(), size)


def _digit_table(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    columns = int(rng.integers(3, 9))
    rows, length = [], 0
    while length < size:
        cells = [f"{rng.integers(0, 100000):>7d}" if c % 2 == 0 else f"{rng.random() * 1000:>10.3f}"
                 for c in range(columns)]
        row = " ".join(cells) + "\n"
        rows.append(row)
        length += len(row)
    return "".join(rows).encode()[:size]


def _word_salad(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    out, length = [], 0
    while length < size:
        sentence = " ".join(rng.choice(WORDS, int(rng.integers(5, 16)))).capitalize() + "."
        sentence += "\n\n" if rng.random() < 0.2 else " "
        out.append(sentence)
        length += len(sentence)
    return "".join(out).encode()[:size]


def _shuffled_bytes(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    for at in rng.permutation(len(stdlib)):  # the first drawn file with enough ASCII text (a file's bytes, in order)
        raw = _decoded(stdlib[at].read_bytes())
        ascii_bytes = bytes(b for b in (raw or b"") if b < 128)
        if len(ascii_bytes) >= size:
            ascii_bytes = np.frombuffer(ascii_bytes[:size], dtype=np.uint8)
            return ascii_bytes[rng.permutation(size)].tobytes()
    words = np.frombuffer(_fit(" ".join(WORDS).encode(), size), dtype=np.uint8)  # no file long enough: the word list
    return words[rng.permutation(size)].tobytes()


def _hex_dump(size: int, rng: np.random.Generator, stdlib: list[Path]) -> bytes:
    lines, length, offset = [], 0, 0
    while length < size:
        chunk = rng.bytes(16)
        hexes = " ".join(chunk[i:i + 2].hex() for i in range(0, 16, 2))
        shown = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        line = f"{offset:08x}: {hexes}  {shown}\n"
        lines.append(line)
        length += len(line)
        offset += 16
    return "".join(lines).encode()[:size]


JUNK = {"base64": _base64, "minified": _minified, "repeated_line": _repeated_line, "digit_table": _digit_table,
        "word_salad": _word_salad, "shuffled_bytes": _shuffled_bytes, "hex_dump": _hex_dump}
assert tuple(JUNK) == JUNK_KINDS


def _walk(root: Path, prune: frozenset = frozenset()) -> list[tuple[str, Path]]:
    """``(path relative to root, path)`` of every file under ``root``, sorted: folders named in ``SKIPPED_DIRS`` or
    ``prune`` left out, symbolic links to folders not followed (strings, not pathlib, while walking: site-packages
    holds tens of thousands of files)."""
    found, todo = [], [("", str(root))]
    while todo:
        rel, folder = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            name = f"{rel}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIPPED_DIRS and entry.name not in prune:
                    todo.append((name + "/", entry.path))
            elif entry.is_file():
                found.append((name, entry.path))
    return [(rel, Path(path)) for rel, path in sorted(found)]


def _is_prose(path: Path) -> bool:
    name = path.name
    return (name.endswith(PROSE_SUFFIXES) or name.startswith(PROSE_PREFIXES)
            or (name == "METADATA" and path.parent.name.endswith(".dist-info")))


class DomainSource:
    """A mixed-domain corpus from what every Python install carries (see the module's docstring): standard-library
    code without ``exclude``, third-party code, documentation and licences, C headers and generated junk, each text
    named ``<domain>/...``. ``per_domain``: files per real domain (an int, or ``{domain: files}``); ``per_package``:
    the most files one top-level package gives a domain (stdlib, site, prose); ``junk``: generated junk texts of about
    ``junk_bytes`` bytes; ``min_bytes``: the smallest file drawn; ``seed``: every draw and the junk;
    ``site_packages``: the third-party folders (default: ``sysconfig``'s purelib and platlib)."""

    item = "file"

    def __init__(self, exclude: list[str] | None = None, per_domain: int | Mapping = 200, per_package: int = 12,
                 junk: int = 70, junk_bytes: int = 4096, min_bytes: int = 512, seed: int = 0,
                 site_packages: list[str] | None = None):
        self.exclude = [str(e) for e in (exclude or [])]
        if isinstance(per_domain, Mapping):
            unknown = [d for d in per_domain if d not in REAL_DOMAINS]
            if unknown:
                raise DataConfigError(f"data.source.per_domain names {unknown}; the domains are "
                                      f"{', '.join(REAL_DOMAINS)} (junk has data.source.junk)")
            self.per_domain = {d: per_domain.get(d, 0) for d in REAL_DOMAINS}
        else:
            self.per_domain = {d: per_domain for d in REAL_DOMAINS}
        for setting, value in [*((f"per_domain.{d}", n) for d, n in self.per_domain.items()), ("junk", junk),
                               ("per_package", per_package), ("junk_bytes", junk_bytes), ("min_bytes", min_bytes)]:
            least = 1 if setting in ("per_package", "junk_bytes") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DataConfigError(f"data.source.{setting}={value!r}: give an integer ≥ {least}")
        self.per_package, self.junk, self.junk_bytes = per_package, junk, junk_bytes
        self.min_bytes, self.seed = min_bytes, seed
        paths = sysconfig.get_paths()
        self.stdlib = Path(paths["stdlib"])
        self.include = Path(paths["include"])
        wanted = site_packages or [paths["purelib"], paths["platlib"]]
        self.site = list(dict.fromkeys(Path(p).resolve() for p in wanted))
        self.counts: dict[str, int] | None = None  # files per domain, once loaded
        self.skipped: dict[str, int] = {}  # drawn files skipped, by why: not UTF-8 text, a copy

    def known_junk(self, name: str) -> str:
        """The junk kind of a document of this source (``''``: not junk): the corpus's ground truth under noise=none
        (``CorpusDataModule._corrupt``), the kinds written down here before any run."""
        return junk_kind_of(name) or ""

    def describe(self) -> str:
        held = (", ".join(f"{d} {self.counts[d]}" for d in DOMAINS) + " files" if self.counts is not None else
                ", ".join(f"{d} ≤{n}" for d, n in self.per_domain.items()) + f", junk {self.junk} files")
        without = f"; stdlib without {', '.join(self.exclude)}" if self.exclude else ""
        return f"a mixed-domain corpus of Python {sys.version.split()[0]}'s install ({held}{without})"

    # ------------------------------------------------------------------ candidates per domain
    def _stdlib_files(self) -> list[tuple[str, Path]]:
        return _walk(self.stdlib, frozenset({"site-packages", "dist-packages"}))

    def _candidates(self) -> dict[str, list[tuple[str, Path, str]]]:
        """Per real domain, ``(name, path, group)`` of every file it may draw (``group``: the top-level package the
        per-package cap counts), sorted by name, files shorter than ``min_bytes`` left out."""
        found = {d: [] for d in REAL_DOMAINS}
        for rel, path in self._stdlib_files():
            if top_level(rel) in self.exclude:
                continue
            if rel.endswith(".py"):
                found["stdlib"].append((f"stdlib/{rel}", path, top_level(rel)))
            elif _is_prose(path):
                found["prose"].append((f"prose/stdlib/{rel}", path, "stdlib:" + top_level(rel)))
        for root in self.site:
            for rel, path in _walk(root) if root.is_dir() else []:
                if rel.endswith(".py"):
                    found["site"].append((f"site/{rel}", path, top_level(rel)))
                elif _is_prose(path):
                    found["prose"].append((f"prose/site/{rel}", path, "site:" + top_level(rel)))
        if self.include.is_dir():
            found["c"] = [(f"c/{rel}", path, "include") for rel, path in _walk(self.include) if rel.endswith(".h")]
        return {d: sorted((c for c in files if c[1].stat().st_size >= self.min_bytes), key=lambda c: c[0])
                for d, files in found.items()}

    def _drawn(self, domain: str, files: list[tuple[str, Path, str]], seen: set[bytes],
               skipped: dict[str, int]) -> list[tuple[str, bytes]]:
        """``per_domain[domain]`` text files of the domain, at most ``per_package`` of one group (c: no cap), drawn
        at random in a seeded order, in name order. A binary file, or a text in ``seen`` (an earlier text's copy, or a
        file of an excluded package's), is skipped for the next one drawn, and counted in ``skipped``."""
        rng = np.random.default_rng([self.seed, REAL_DOMAINS.index(domain)])
        cap = None if domain == "c" else self.per_package
        per_group: dict[str, int] = {}
        texts = []
        for at in rng.permutation(len(files)):
            if len(texts) >= self.per_domain[domain]:
                break
            name, path, group = files[at]
            if cap is not None and per_group.get(group, 0) >= cap:
                continue
            raw = _decoded(path.read_bytes())
            why = "not UTF-8 text" if raw is None else "a copy" if raw in seen else None
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            seen.add(raw)
            per_group[group] = per_group.get(group, 0) + 1
            texts.append((name, raw))
        return sorted(texts)

    def _junk(self, stdlib: list[tuple[str, Path, str]]) -> list[tuple[str, bytes]]:
        paths = [path for _, path, _ in stdlib]
        texts = []
        for n in range(self.junk):
            kind = JUNK_KINDS[n % len(JUNK_KINDS)]
            rng = np.random.default_rng([self.seed, len(REAL_DOMAINS), n])
            size = int(rng.integers(self.junk_bytes // 2, self.junk_bytes * 3 // 2 + 1))
            texts.append((f"junk/{kind}/{n:03d}", JUNK[kind](size, rng, paths)))
        return texts

    def load(self) -> list[tuple[str, bytes]]:
        stdlib = self._stdlib_files()
        present = {top_level(rel) for rel, _ in stdlib}
        unknown = [e for e in self.exclude if e not in present]
        if unknown:
            raise DataConfigError(f"data.source.exclude={self.exclude}: {unknown} is no top-level package or module of "
                                  f"the standard library ({self.stdlib})")
        candidates = self._candidates()
        # the excluded packages' own files: a copy of one elsewhere (vendored) is never drawn, so J stays held out
        seen = {raw for rel, path in stdlib if rel.endswith(".py") and top_level(rel) in self.exclude
                and (raw := _decoded(path.read_bytes())) is not None}
        texts, self.skipped = [], {}
        for domain in REAL_DOMAINS:
            texts += self._drawn(domain, candidates[domain], seen, self.skipped)
        texts += self._junk(candidates["stdlib"])
        if self.skipped.get("not UTF-8 text"):
            warnings.warn(f"{self.describe()}: {self.skipped['not UTF-8 text']} drawn files are not UTF-8 text (NUL "
                          f"bytes or invalid UTF-8) and are skipped, the next ones drawn instead", stacklevel=2)
        if not texts:
            raise DataConfigError(f"{self.describe()} holds no text: raise data.source.per_domain or data.source.junk")
        self.counts = {d: sum(domain_of(n) == d for n, _ in texts) for d in DOMAINS}
        return texts
