"""A corpus of one's own, end to end: the documented commands (docs/reference.md, "A language model on a corpus") run
as written on a tiny JSONL file and a tiny folder, with ``noise=none`` (real data), a JSONL target set, the test set
held out of it or given as a file of its own; every split dealt exactly what it uses, every line of the pool scored or
named as dropped; and what a user's data gets wrong named by its line."""
import csv
import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from pmp_lightning.data.corpus import CorpusDataModule, FolderSource, JsonlSource, StdlibSource, source_at
from pmp_lightning.data.corruption import Corruption
from pmp_lightning.data.noise import LabelNoise
from pmp_lightning.errors import DataConfigError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model reads every line of the corpus and learns which word follows which one so that a target set "
         "defines what good text looks like here").split()


def sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)) + "."


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def lines(seed: int, n: int, short_every: int = 0) -> list[str]:
    """``n`` texts of 8-30 words (one to five windows of 33 bytes); every ``short_every``-th one a word or two, shorter
    than one window."""
    rng = np.random.default_rng(seed)
    return [sentence(rng, 2) if short_every and k % short_every == short_every - 1 else sentence(rng, rng.integers(8, 30))
            for k in range(n)]


def corpus(tmp_path, n=40, **kwargs) -> CorpusDataModule:
    """A tiny JSONL pool without corruption, windows of 17 bytes."""
    path = write_jsonl(tmp_path / "pool.jsonl", kwargs.pop("texts", None) or lines(0, n))
    settings = dict(noise=LabelNoise("none", 0.0), length=16, test_size=5, downstream_size=5, pool_size=None) | kwargs
    return CorpusDataModule(JsonlSource(str(path)), **settings)


# ------------------------------------------------------------------ noise=none on a corpus (real data)
def test_noise_none_leaves_a_corpus_as_it_is(tmp_path):
    """noise=none (a LabelNoise of kind none) is the real-data mode: no document changed, no ground truth, and without
    a target set of one's own a warning that J is as unchecked as the pool. Label noise is refused, naming the fix.
    Guard: noise=corrupt still corrupts."""
    with pytest.warns(UserWarning, match="the same unchecked corpus as the pool.*data.downstream="):
        dm = corpus(tmp_path)
        dm.setup()
    assert not dm.is_mislabeled.any() and set(dm.corruption_kind) == {""}
    texts = dict(JsonlSource(str(tmp_path / "pool.jsonl")).load())
    assert all(texts[d.name.split("@")[0]].find(d.text) >= 0 for d in dm.pool_documents)  # the corpus's own bytes
    assert "warning" in dm.downstream_note
    with pytest.raises(DataConfigError, match="noise=symmetric changes class labels, and a corpus has none: use "
                                              "noise=corrupt .* or noise=none"):
        corpus(tmp_path, noise=LabelNoise("symmetric", 0.2))
    dm = CorpusDataModule(JsonlSource(str(tmp_path / "pool.jsonl")), Corruption(rate=0.25), length=16, test_size=5,
                          downstream_size=5, pool_size=None)
    dm.setup()
    assert dm.is_mislabeled.sum() == round(0.25 * len(dm.pool)) and "warning" not in dm.downstream_note


# ------------------------------------------------------------------ exact dealing, and what went where
def test_each_split_is_dealt_exactly_what_it_uses(tmp_path, caplog):
    """Texts are dealt in turn until a split has its size: the test set (5 documents) takes the lines it needs, not
    four times as many, and the pool (null: every document left) gets every other line. A line that gives a split
    more documents than it needs leaves its others dropped and counted; none of a line goes to two splits. Every line
    is accounted for in ground_truth's corpus_fate and in the one log line. Guard: the old dealing took 20 documents'
    worth of lines for the test set and dropped 15 of them."""
    with caplog.at_level(logging.INFO, logger="pmp_lightning.data.corpus"), pytest.warns(UserWarning):
        dm = corpus(tmp_path, texts=lines(0, 40, short_every=10))
        dm.setup()
    texts = JsonlSource(str(tmp_path / "pool.jsonl")).load()
    windows = {name: len(text) // 17 for name, text in texts}
    line_of = lambda docs: {d.name.split("@")[0] for d in docs}  # noqa: E731
    test, target, pool = line_of(dm.test_documents), line_of(dm.target_documents), line_of(dm.pool_documents)
    assert len(dm.test_set) == len(dm.downstream) == 5 and not (test & target or test & pool or target & pool)
    assert sum(windows[n] for n in test) - 5 < max(windows[n] for n in test)  # only the lines the test set needs
    short = {name for name, n in windows.items() if n == 0}
    assert len(short) == 4 and pool == set(windows) - short - test - target
    assert len(dm.pool) == sum(windows[n] for n in pool)  # every window of every pool line
    truth = dm.ground_truth()
    fates = dict(zip(truth["corpus_text"], truth["corpus_fate"]))
    assert set(fates) == set(windows) and {n for n, f in fates.items() if f == "pool"} == pool
    assert {n for n, f in fates.items() if f.startswith("dropped: shorter than one window")} == short
    surplus = sum(windows[n] for n in test | target) - 10
    line = next(r.message for r in caplog.records if r.message.startswith("corpus splits:"))
    assert re.search(rf"test set 5 documents from {len(test)} lines?, target set 5 documents from {len(target)} lines?, "
                     rf"pool {len(dm.pool)} documents from {len(pool)} lines;", line)
    assert "dropped 4 lines shorter than one window (17 tokens: data.length + 1) (line 10, line 20, line 30, …)" in line
    assert (f"{surplus} documents of the lines that filled a split, beyond its size" in line) == (surplus > 0)


def test_a_file_gives_its_split_at_most_max_per_file_documents(tmp_path, caplog):
    """data.max_per_file: a long text gives its split that many of its windows, drawn at random, so that a split holds
    many texts (the standard library's default, 32); the rest are counted as dropped."""
    long = [" ".join(lines(k, 12)) for k in range(6)]  # about 12 × 19 words: some 60 windows of 17 bytes each
    with caplog.at_level(logging.INFO, logger="pmp_lightning.data.corpus"), pytest.warns(UserWarning):
        dm = corpus(tmp_path, texts=long, test_size=4, downstream_size=4, max_per_file=4)
        dm.setup()
    per_line = {}
    for doc in dm.pool_documents:
        per_line[doc.name.split("@")[0]] = per_line.get(doc.name.split("@")[0], 0) + 1
    assert set(per_line.values()) == {4} and len(per_line) == 4
    offsets = [int(d.name.split("@")[1]) for d in dm.pool_documents[:4]]
    assert offsets == sorted(offsets) and offsets != [0, 17, 34, 51]  # drawn at random, kept in order
    assert "documents beyond data.max_per_file of their line" in caplog.text


def test_a_split_too_small_is_named_with_the_setting_to_change(tmp_path):
    with pytest.raises(DataConfigError, match=r"the pool \(data.pool_size\) needs 10000 documents but the JSONL file .* "
                                              r"has only \d+ left after the earlier splits \(test set, target set\)"):
        corpus(tmp_path, pool_size=10000).setup()
    with pytest.raises(DataConfigError, match=r"wide slice \(data.wide_size\) needs 5 documents .* data.pool_size=null "
                                              r"deals every document left to the pool: give it a number"):
        corpus(tmp_path, wide_size=5).setup()


# ------------------------------------------------------------------ a target set and a test set of one's own
def test_the_test_set_is_held_out_of_a_target_file_or_given_as_one(tmp_path):
    """data.downstream=<a JSONL file>: the test set (data.test_size documents) is held out of it, J the rest, and the
    pool's lines all go to the pool (none to the test or target sets); data.test=<a file> gives the test set instead,
    all of it, and J the whole target file. Guard: before, the test set was dealt from the user's pool."""
    target = write_jsonl(tmp_path / "target.jsonl", lines(1, 20))
    test = write_jsonl(tmp_path / "test.jsonl", lines(2, 6))
    dm = corpus(tmp_path, downstream=str(target))
    dm.setup()
    target_texts = [t for _, t in JsonlSource(str(target)).load()]
    assert len(dm.test_set) == 5 and all(any(d.text in t for t in target_texts) for d in dm.test_documents)
    assert not {d.text for d in dm.test_documents} & {d.text for d in dm.target_documents}
    assert set(dm.ground_truth()["corpus_fate"]) == {"pool"}
    assert dm.downstream_note["held_out_for_test"] == 5 and "held out of J" in dm.test_note["source"]
    own = corpus(tmp_path, downstream=str(target), test=str(test))
    own.setup()
    assert len(own.test_set) == len([d for n, t in JsonlSource(str(test)).load() for d in own._cut(n, t)])
    assert len(own.downstream) == sum(len(own._cut(n, t)) for n, t in JsonlSource(str(target)).load())
    assert "data.test" in own.test_note["source"]
    with pytest.raises(DataConfigError, match=r"the test set \(data.test_size=10000\) is held out of the target set, the "
                                              r"JSONL file .*target.jsonl \(data.downstream\), which holds only \d+ "
                                              r"documents; lower data.test_size \(J keeps the rest\) .*data.test="):
        corpus(tmp_path, downstream=str(target), test_size=10000).setup()


def test_a_target_file_that_gives_canaries_keeps_them_out_of_j(tmp_path):
    """A target file of your own gives its first documents for the canaries (``_hold_out_canaries``); J, both as the
    tokens the replay's objective reads and as the documents DSIR fits its target on, is what it leaves: no canary's
    clean twin is in J. Guard: before, ``target_documents`` still held the canaries' twins, so DSIR saw them."""
    target = write_jsonl(tmp_path / "target.jsonl", lines(1, 60))
    dm = corpus(tmp_path, downstream=str(target), canaries=4)
    dm.setup()
    assert dm.canary_mask is not None and dm.canary_mask.sum() == 4
    assert len(dm.target_documents) == len(dm.downstream)
    twins = {tuple(dm.scored[i][0].tolist()) for i in range(len(dm.pool) + 4, len(dm.scored))}
    assert len(twins) == 4 and not twins & {tuple(dm.downstream[i][0].tolist()) for i in range(len(dm.downstream))}


def test_a_path_is_read_as_the_pool_is(tmp_path):
    (tmp_path / "texts").mkdir()
    assert isinstance(source_at(str(tmp_path / "texts"), "data.downstream", FolderSource("x", [".md"])), FolderSource)
    assert source_at(str(tmp_path / "texts"), "data.downstream", FolderSource("x", [".md"])).suffixes == [".md"]
    (tmp_path / "t.jsonl").write_text("")
    assert source_at(str(tmp_path / "t.jsonl"), "data.test", JsonlSource("x", field="body")).field == "body"
    with pytest.raises(DataConfigError, match=r"data.test='/nowhere.jsonl': no such file or folder"):
        source_at("/nowhere.jsonl", "data.test")


def test_sets_sharing_documents_with_the_pool_are_refused_by_name(tmp_path):
    """A target set (or a test file) holding documents of the pool is refused, naming a few of them on both sides (a
    line and its window): J must not contain documents it scores, nor the test set documents the model trained on."""
    pool = lines(0, 40)
    sharing = write_jsonl(tmp_path / "sharing.jsonl", lines(1, 10) + [pool[4], pool[7]])
    clean = write_jsonl(tmp_path / "clean.jsonl", lines(2, 10))
    with pytest.raises(DataConfigError, match=r"the target set \(data.downstream\) shares \d+ documents with the pool "
                                              r"\(line 11@0 = the pool's line 5@0, .*\); J must not contain"):
        corpus(tmp_path, texts=pool, downstream=str(sharing), test=str(clean)).setup()
    with pytest.raises(DataConfigError, match=r"the test set \(data.test\) shares \d+ documents with the training set "
                                              r"\(line 11@0 = the training set's line 5@0, .*\); the model would be"):
        corpus(tmp_path, texts=pool, downstream=str(clean), test=str(sharing)).setup()


# ------------------------------------------------------------------ what a user's file gets wrong, by its line
def test_a_jsonl_file_that_is_not_utf8_is_named_by_its_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"text": "one"}\n{"text": "two"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataConfigError, match=r"corpus.jsonl, line 3: not UTF-8 text \(byte b'\\xe9' at column 14"):
        JsonlSource(str(path)).load()


def test_a_jsonl_line_is_what_a_newline_ends(tmp_path):
    """A JSON string may hold U+2028 (a line separator to Python's str.splitlines, not to JSONL): the line stays one
    document, and the lines after it keep their numbers."""
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "c"}) + "\n",
                    encoding="utf-8")
    assert JsonlSource(str(path)).load() == [("line 1", "a\u2028b".encode()), ("line 2", b"c")]


@pytest.mark.filterwarnings("ignore:J comes from")
def test_duplicated_documents_are_named_in_a_warning(tmp_path):
    texts = lines(0, 30)
    texts[20], texts[25], texts[29] = texts[3], texts[3], texts[8]
    with pytest.warns(UserWarning, match=r"3 lines repeat another's text exactly \(2 texts occur more than once: "
                                         r"line 4 = line 21 = line 26; line 9 = line 30\)"):
        corpus(tmp_path, texts=texts, downstream_size=2, test_size=2).setup()


def test_data_path_is_the_corpus_of_data_jsonl_and_data_folder(tmp_path):
    """data=jsonl and data=folder give a partial source that reads data.path; without it, the one setting to give is
    named; data.path on a source that takes none is refused."""
    write_jsonl(tmp_path / "pool.jsonl", lines(0, 40))
    cfg = compose_data(tmp_path, "+experiment=code_lm", "data=jsonl", f"data.path={tmp_path / 'pool.jsonl'}",
                       "data.downstream_size=5")
    dm = build(cfg)
    assert isinstance(dm.source, JsonlSource) and dm.source.path == tmp_path / "pool.jsonl"
    with pytest.raises(DataConfigError, match=r"data.path is not set: it is your corpus \(FolderSource\), e.g. "
                                              r"data.path=/my/texts"):
        build(compose_data(tmp_path, "+experiment=code_lm", "data=folder"))
    with pytest.raises(DataConfigError, match="StdlibSource.* does not read a path; .* data=jsonl or data=folder"):
        CorpusDataModule(StdlibSource(), None, path="x")


# ------------------------------------------------------------------ the documented commands, as written
DOC_PATHS = ("/my/corpus.jsonl", "/my/target.jsonl", "/my/test.jsonl", "/my/texts", "/my/target")
TINY = ["data.length=32", "data.test_size=16", "data.batch_size=8", "model.max_len=32", "model.dim=16", "model.depth=1",
        "model.heads=2", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "replay.hvp_samples=16",
        "replay.lanczos_steps=4", "logger=none"]
SHRUNK = {"data.pool_size": "60", "data.wide_size": "40"}  # a documented size, at the tiny corpus's scale


def documented_commands() -> list[str]:
    """The commands for a corpus of one's own in the README's and docs/reference.md's corpus sections, as written
    (a command in both is run once)."""
    commands = []
    for doc, end in (("README.md", "\n### "), ("docs/reference.md", "\n## ")):
        text = (ROOT / doc).read_text()
        section = text[text.index("### A language model on a corpus"):]
        section = section[:section.index(end, 1)]
        commands += [line.split("  #")[0].strip() for line in re.findall(r"^python run\.py .*$", section, re.M)
                     if "data=jsonl" in line or "data=folder" in line]
    return list(dict.fromkeys(commands))


def user_files(tmp_path: Path) -> dict[str, str]:
    """The tiny corpus behind each path the documented commands name: a JSONL pool (a few lines shorter than one
    window), a JSONL target set, a JSONL test set, a folder of .md texts (a .txt beside them, which suffixes leave
    out) and a target folder."""
    pool = write_jsonl(tmp_path / "corpus.jsonl", lines(0, 90, short_every=15))
    target = write_jsonl(tmp_path / "target.jsonl", lines(1, 30))
    test = write_jsonl(tmp_path / "test.jsonl", lines(2, 8))
    texts, target_dir = tmp_path / "texts", tmp_path / "target"
    texts.mkdir()
    target_dir.mkdir()
    for k, text in enumerate(lines(3, 60)):
        (texts / f"doc{k:02d}.md").write_text(text)
    (texts / "notes.txt").write_text(" ".join(lines(4, 5)))
    for k, text in enumerate(lines(5, 20)):
        (target_dir / f"t{k:02d}.md").write_text(text)
    return dict(zip(DOC_PATHS, map(str, (pool, target, test, texts, target_dir))))


def as_written(command: str, files: dict[str, str]) -> list[str]:
    """The command's overrides with the paths it names pointing at the tiny corpus and its sizes shrunk to it."""
    args = shlex.split(command)[2:]
    args = [re.sub("|".join(re.escape(p) for p in sorted(DOC_PATHS, key=len, reverse=True)),
                   lambda m: files[m.group(0)], a) for a in args]
    args = [f"{a.split('=')[0]}={SHRUNK[a.split('=')[0]]}" if a.split("=")[0] in SHRUNK else a for a in args]
    assert not any("/my/" in a for a in args), args
    return args


def compose_data(tmp_path, *overrides, cache=None):
    """A run's config: ``overrides`` (a command's, as written), then the tiny sizes and the test's paths."""
    from hydra import compose, initialize_config_dir

    from pmp_lightning.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides, *TINY, f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                            f"paths.cache_dir={cache or tmp_path / 'cache'}"])


def build(cfg):
    """The run's data, set up as the run's data stage does (no training), or the project's own error behind Hydra's."""
    from pmp_lightning.config import check_settings
    from pmp_lightning.data.base import datamodule_from_config
    from pmp_lightning.policy import resolve as scoring_defaults

    check_settings(cfg)
    try:
        dm = datamodule_from_config(scoring_defaults(cfg))
    except Exception as err:  # noqa: BLE001 — Hydra wraps what a _target_ raises
        cause = err
        while cause is not None and not isinstance(cause, DataConfigError):
            cause = cause.__cause__
        raise cause or err
    dm.setup()
    return dm


def test_the_documents_name_the_commands_this_file_runs():
    commands = documented_commands()
    assert len(commands) >= 4 and all(any(p in c for p in DOC_PATHS) for c in commands)
    assert any("noise=none" in c and "data.downstream=/my/target.jsonl" in c and "data.test=" not in c for c in commands)
    assert any("data.test=/my/test.jsonl" in c for c in commands) and any("data=folder" in c for c in commands)
    readme = (ROOT / "README.md").read_text()
    assert any(c in readme for c in commands)  # the README's own corpus command is among those run


@pytest.mark.parametrize("number", range(len(documented_commands())))
def test_a_documented_command_sets_its_data_up_as_written(tmp_path, number):
    """Each documented command composes and deals its data as written (no training): the pool's every line scored or
    named as dropped, the target and test sets where the command puts them."""
    args = as_written(documented_commands()[number], user_files(tmp_path))
    dm = build(compose_data(tmp_path / "run", *args))
    check_accounting(dm, args)


def check_accounting(dm, args):
    """Every text of the pool's source is in the pool (or the wide slice), or dropped for a reason, when the command
    gives its own target set; the target and test sets come from where the command says."""
    fates = dict(zip(dm.ground_truth()["corpus_text"], dm.ground_truth()["corpus_fate"]))
    settings = dict(a.split("=", 1) for a in args if "=" in a)
    shrunk = "data.pool_size" in settings
    assert all(f in ("pool", "wide slice") or f.startswith("dropped:") or (shrunk and f.startswith("not dealt"))
               for f in fates.values()), set(fates.values())
    assert {d.name.split("@")[0] for d in dm.pool_documents} == {n for n, f in fates.items() if f == "pool"}
    assert dm.trusted.path == Path(settings["data.downstream"])
    if "data.test" in settings:
        assert dm.test_source.path == Path(settings["data.test"]) and "held_out_for_test" not in dm.downstream_note
    else:
        assert dm.downstream_note["held_out_for_test"] == len(dm.test_set) == 16
    if "data.source.suffixes" in settings:
        assert "notes.txt" not in fates and all(n.endswith(".md") for n in fates)


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(documented_commands())))
def test_a_documented_command_runs_as_written(tmp_path_factory, number):
    """The documented commands for a corpus of one's own run end to end (tiny sizes; the first two share a cache, as
    they share their training): every line of the pool is in scores.csv or named as dropped in ground_truth.npz;
    noise=none skips detection; selection is measured on the target set's held-out documents, and says so; the wide
    slice's documents are in wide_scores.csv, named as scores.csv names the pool's."""
    from pmp_lightning.pipeline import run

    command = documented_commands()[number]
    out = tmp_path_factory.mktemp(f"command{number}")
    args = as_written(command, user_files(out))
    metrics = run(compose_data(out, *args, cache=tmp_path_factory.getbasetemp() / "shared_cache"))
    truth = np.load(out / "ground_truth.npz")
    fates = dict(zip(truth["corpus_text"], truth["corpus_fate"]))
    scored = {r["document"].split("@")[0] for r in csv.DictReader((out / "scores.csv").open())}
    assert scored == {n for n, f in fates.items() if f == "pool"}
    assert all(f in ("pool", "wide slice") or f.startswith(("dropped:", "not dealt")) for f in fates.values())
    if "noise=none" in command:
        assert metrics["detection"] == {} and not truth["is_mislabeled"].any()
    else:
        assert metrics["detection"] and 0 < truth["is_mislabeled"].sum() <= round(0.2 * len(truth["is_mislabeled"]))
    if "select.fractions" in command:
        sel = metrics["selection"]
        assert "held out of J" in sel["measured_on"] and sel["oracle"] == sel["full"]  # no ground truth: no oracle
        assert set(sel["0.1"]) == {"cosine", "loss", "dsir", "random"}
    if "data.wide_size" in command:
        rows = list(csv.DictReader((out / "wide_scores.csv").open()))
        assert len(rows) == 40 and list(rows[0]) == ["index", "document", "corruption", "is_mislabeled", "scorer",
                                                     "loss", "dsir", "rho_loss", "random"]
        assert {r["document"].split("@")[0] for r in rows} == {n for n, f in fates.items() if f == "wide slice"}
        assert metrics["scorer"]["wide"]["file"] == "wide_scores.csv"
