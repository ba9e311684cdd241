"""The language-model setting's parts: the corpus and its documents, the byte tokenizer, corrupted documents with
ground truth, the causal transformer, and the document loss in the statistics pass (exact against vmap(grad) in
float64, the padding of short files included)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pmp_lightning.data.corpus import FolderSource, JsonlSource, StdlibSource, documents, tokenize, top_level
from pmp_lightning.data.corruption import CORRUPTIONS, Corruption
from pmp_lightning.errors import DataConfigError, SettingError
from pmp_lightning.models.gpt import GPT
from pmp_lightning.statistics.per_example import per_example_stats
from pmp_lightning.statistics.plan import make_plan
from pmp_lightning.task import IGNORE, training_loss
from tests.test_stats import check, reference

TEXT = b"def f(x):\n    return x + 1\n\n\nclass A:\n    '''A docstring.'''\n    value = f(2)\n"


# ------------------------------------------------------------------ the corpus
def test_the_standard_library_is_a_corpus():
    source = StdlibSource(packages=["json"])
    texts = source.load()
    assert texts and all(top_level(name) == "json" for name, _ in texts)
    assert any(name == "json/decoder.py" for name, _ in texts)
    assert "standard library" in source.describe() and "Python 3." in source.describe()
    assert top_level("json.py") == "json" and top_level("email/mime/text.py") == "email"
    with pytest.raises(DataConfigError, match="no such package"):
        StdlibSource(packages=["no_such_package_here"]).load()


def test_windows_and_files_are_deterministic_and_sized():
    texts = [("a.py", TEXT), ("b.py", TEXT[:20])]
    docs = documents(texts, "window", 16)
    assert [d.name for d in docs] == ["a.py@0", "a.py@17", "a.py@34", "a.py@51", "b.py@0"]
    assert all(len(d.text) == 17 for d in docs) and docs[1].text == TEXT[17:34]
    whole = documents(texts, "file", 64)
    assert [len(d.text) for d in whole] == [65, 20]
    x, y = tokenize(whole, 64)
    assert x.shape == y.shape == (2, 64)
    assert bytes(x[0].tolist()) == TEXT[:64] and bytes(y[0].tolist()) == TEXT[1:65]
    assert (y[1, 19:] == IGNORE).all() and bytes(y[1, :19].tolist()) == TEXT[1:20]  # padding: left out of the loss
    with pytest.raises(DataConfigError, match="lower data.length, or use data.unit=file"):
        documents(texts, "window", 200)


def test_a_bpe_trained_on_the_corpus_cuts_windows_of_tokens():
    """data.tokenizer=BPETokenizer: a byte-level BPE trained on the corpus's own texts, deterministic (the same
    vocabulary twice); windows hold length + 1 tokens, not bytes, so a window spans more bytes than tokens; each
    window's text tokenizes back to its length + 1 tokens (the boundaries may move a token, no more), and the model's
    inputs and targets are those tokens. Guard: the byte tokenizer's windows are length + 1 bytes."""
    from pmp_lightning.data.corpus import BPETokenizer

    texts = StdlibSource(packages=["json"]).load()
    bpe = BPETokenizer(vocab_size=400).fit([t for _, t in texts])
    again = BPETokenizer(vocab_size=400).fit([t for _, t in texts])
    assert bpe.vocab_size == 400 and bpe._bpe.get_vocab() == again._bpe.get_vocab()
    docs = documents(texts, "window", 32, bpe)
    assert docs and np.mean([len(d.text) for d in docs]) > 2 * 33  # code compresses to well over two bytes per token
    counts = [bpe.count(d.text) for d in docs]
    assert all(31 <= c <= 35 for c in counts) and np.mean([c == 33 for c in counts]) > 0.8
    x, y = tokenize(docs, 32, bpe)
    ids = bpe.encode(docs[0].text)[:33]
    assert x[0, :len(ids) - 1].tolist() == ids[:-1] and y[0, :len(ids) - 1].tolist() == ids[1:]
    assert int(x.max()) < 400 and all(len(d.text) == 33 for d in documents(texts, "window", 32))
    with pytest.raises(DataConfigError, match="give more than 256"):
        BPETokenizer(vocab_size=100)


def test_folder_errors_are_named(tmp_path):
    with pytest.raises(DataConfigError, match="holds no files"):
        FolderSource(str(tmp_path)).load()
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataConfigError, match="none of its 1 files is text"), pytest.warns(UserWarning):
        FolderSource(str(tmp_path)).load()
    (tmp_path / "a.txt").write_bytes(TEXT)
    with pytest.warns(UserWarning, match="1 of 2 files are not UTF-8 text"):
        assert FolderSource(str(tmp_path)).load() == [("a.txt", TEXT)]
    assert FolderSource(str(tmp_path), suffixes=[".txt"]).load() == [("a.txt", TEXT)]
    with pytest.raises(DataConfigError, match="is not a folder"):
        FolderSource(str(tmp_path / "a.txt")).load()


def test_a_text_in_several_files_is_dealt_to_one_split_only(tmp_path):
    """Files that share a window (a licence header, a copied module) do not put the same document into two splits:
    J never holds a document it scores, and the test set none the model trains on. Guard: here every file opens with
    the same window, so without the rule the target set and the pool would share it and the run would be refused."""
    from pmp_lightning.data.corpus import CorpusDataModule
    from pmp_lightning.data.corruption import Corruption

    header = b"# Copyright (c) the authors.\n"  # 30 bytes: the first window of every file below
    for k in range(40):
        (tmp_path / f"m{k:02d}.py").write_bytes(header + f"def f{k}(x):\n    return x * {k} + {k * k}\n".encode() * 3)
    dm = CorpusDataModule(FolderSource(str(tmp_path)), Corruption(rate=0.0), length=29, pool_size=20,
                          downstream_size=5, test_size=5)
    dm.setup()
    texts = [{d.text for d in docs} for docs in (dm.pool_documents, dm.target_documents)]
    assert not texts[0] & texts[1] and sum(header in t for t in texts[0] | texts[1]) <= 1


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    with pytest.raises(DataConfigError, match=r"line 3: no string field 'text' \(found \['body'\]\)"):
        JsonlSource(str(path)).load()
    with pytest.raises(DataConfigError, match="line 1: no string field 'body'"):
        JsonlSource(str(path), field="body").load()
    path.write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    assert JsonlSource(str(path)).load() == [("line 1", b"first"), ("line 2", b"second")]
    path.write_text("{not json\n")
    with pytest.raises(DataConfigError, match="line 1: not JSON"):
        JsonlSource(str(path)).load()
    path.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(DataConfigError, match="not UTF-8"):
        JsonlSource(str(path)).load()


# ------------------------------------------------------------------ corruption
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_keeps_the_length_and_changes_the_text(kind):
    rng = np.random.default_rng(0)
    out = CORRUPTIONS[kind](TEXT, rng)
    assert len(out) == len(TEXT) and out != TEXT
    if kind in ("shuffled_lines", "shuffled_tokens", "fragments"):  # a permutation of the document's own bytes
        assert sorted(out) == sorted(TEXT)


def test_corruption_marks_what_it_changed_and_is_seeded():
    docs = documents([("a.py", TEXT * 20)], "window", 32)
    out, mask, kinds = Corruption(rate=0.25, seed=3)(docs)
    assert mask.sum() == round(0.25 * len(docs))
    assert all((o.text != d.text) == m for o, d, m in zip(out, docs, mask))
    assert all(bool(k) == m for k, m in zip(kinds, mask)) and {len(o.text) for o in out} == {33}
    again, mask2, _ = Corruption(rate=0.25, seed=3)(docs)
    assert [o.text for o in again] == [o.text for o in out] and (mask2 == mask).all()
    assert not (Corruption(rate=0.25, seed=4)(docs)[1] == mask).all()
    with pytest.raises(DataConfigError, match="unknown corruption"):
        Corruption(kinds=["typos"])
    with pytest.raises(DataConfigError, match="noise.rate"):
        Corruption(rate=1.5)


# ------------------------------------------------------------------ the model and the document loss
def test_gpt_is_causal_and_tied():
    torch.manual_seed(0)
    net = GPT(max_len=16, dim=32, depth=2, heads=4).eval()
    ids = torch.randint(0, 256, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(0, 256, (2, 4))
    with torch.no_grad():
        a, b = net(ids), net(changed)
    assert a.shape == (2, 10, 256)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # a position sees only the tokens before it
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    assert net.head.weight is net.tokens.weight
    assert GPT(tied=False).head.weight is not GPT(tied=False).tokens.weight
    with pytest.raises(ValueError, match="raise model.max_len"):
        net(torch.zeros(1, 17, dtype=torch.long))


def test_the_document_loss_is_the_mean_over_its_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5))
    y[1, 3:] = IGNORE
    losses = training_loss(logits, y, reduction="none")
    torch.testing.assert_close(losses[0], F.cross_entropy(logits[0], y[0]))
    torch.testing.assert_close(losses[1], F.cross_entropy(logits[1, :3], y[1, :3]))
    torch.testing.assert_close(training_loss(logits, y), losses.mean())


def _corpus_batch(n=5, length=12):
    torch.manual_seed(0)
    texts = [(f"{k}.py", bytes(torch.randint(32, 127, (40,)).tolist())) for k in range(n - 1)] + [("short.py", b"x = 1\n")]
    return tokenize(documents(texts, "file", length), length)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_document_statistics_match_vmap_grad(tied):
    """Every token's gradient summed inside the document, exactly (float64, 1e-9), a padded short file included; the
    outputs per document are the token averages over its targets."""
    x, y = _corpus_batch()
    torch.manual_seed(0)
    net = GPT(max_len=16, dim=16, depth=2, heads=2, tied=tied)
    plan, stats = check(net, x, y)
    if not tied:
        assert all(p.way.name in ("rule", "decompose") for p in plan.parts), plan.summary()
    logits = net(x).detach()
    kept = y[4] != IGNORE
    torch.testing.assert_close(stats["loss"][4], F.cross_entropy(logits[4][kept], y[4][kept]))
    assert float(stats["correct"][4]) == pytest.approx(float((logits[4][kept].argmax(1) == y[4][kept]).double().mean()))
    p = logits[4][kept].softmax(1)
    torch.testing.assert_close(stats["el2n"][4], (p - F.one_hot(y[4][kept], 256)).norm(dim=1).mean())


def test_the_document_check_fails_when_the_padding_counts():
    """Guard: statistics of a loss that averages over the padding too differ from the document loss's gradients."""
    x, y = _corpus_batch()
    torch.manual_seed(0)
    net = GPT(max_len=16, dim=16, depth=1, heads=2).double().eval()
    g = reference(net, x, y)
    v = {k: torch.randn_like(t[0]) for k, t in g.items()}
    dot = sum((g[k] * v[k]).flatten(1).sum(1) for k in g)
    stats = per_example_stats(net, x, y, v, plan=make_plan(net, x, y))
    torch.testing.assert_close(stats["dot"], dot, rtol=1e-9, atol=1e-12)
    padded_counts = y.clone()
    padded_counts[padded_counts == IGNORE] = 0  # the padding read as targets of byte 0
    wrong = per_example_stats(net, x, padded_counts, v, plan=make_plan(net, x, padded_counts))
    assert not torch.allclose(wrong["dot"][4], dot[4], rtol=1e-6)
    torch.testing.assert_close(wrong["dot"][:4], dot[:4], rtol=1e-9, atol=1e-12)  # full documents: the same


# ------------------------------------------------------------------ the whole run, tiny
TINY_LM = ["+experiment=code_lm", "data.source.packages=[json,csv]", "data.length=32", "data.pool_size=60",
           "data.downstream_size=16", "data.test_size=16", "data.batch_size=8", "model.max_len=32", "model.dim=16",
           "model.depth=1", "model.heads=2", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
           "replay.hvp_samples=16", "replay.lanczos_steps=4", "logger=none"]


def make_cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from pmp_lightning.config import register_configs
    from tests.test_pipeline import ROOT

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY_LM, f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                            f"paths.cache_dir={tmp_path / 'cache'}", *overrides])


def spy_on_retrains(monkeypatch) -> list[tuple[int, int]]:
    """(documents, steps) of every training with a step budget (the selection's retrains), as they happen."""
    from pmp_lightning.training import Training

    fit, retrains = Training.fit, []

    def spy(self, train, *args, max_steps=None, **kwargs):
        if max_steps is not None:
            retrains.append((len(train.dataset), max_steps))
        return fit(self, train, *args, max_steps=max_steps, **kwargs)

    monkeypatch.setattr(Training, "fit", spy)
    return retrains


@pytest.mark.slow
def test_code_lm_runs_end_to_end_and_names_the_documents(tmp_path, monkeypatch):
    """The tiny run, with selection: each retrain on the kept documents has the whole pool's token budget (2 epochs
    of 60 documents in batches of 8: 16 steps, whatever it keeps) and reports the test loss."""
    import csv as csv_module

    from pmp_lightning.pipeline import run
    from pmp_lightning.scores.registry import CORPUS_BASELINES, SCORES

    retrains = spy_on_retrains(monkeypatch)
    metrics = run(make_cfg(tmp_path, "select.fractions=[0.2]", "select.scores=[loss,dsir]", "scoring.canaries=0"))
    assert retrains == [(60, 16), *[(48, 16)] * 4]  # whole pool, oracle, loss, dsir (a corpus baseline), random
    sel = metrics["selection"]
    assert sel["measure"] == "test loss" and set(sel["0.2"]) == {"loss", "dsir", "random"}
    assert sel["measured_on"].startswith("16 documents of the Python") and "beside the target set's" in sel["measured_on"]
    assert all(0 < v < 10 for v in [sel["full"], sel["oracle"], *sel["0.2"].values()])
    assert metrics["ground_truth"] == "corrupted documents"
    assert set(metrics["detection"]) == set(SCORES) | set(CORPUS_BASELINES) | {"auto"}
    by_kind = metrics["auroc_by_corruption"]
    assert set(by_kind) <= set(CORRUPTIONS) and all(set(row) == set(metrics["detection"]) for row in by_kind.values())
    assert 0.0 < metrics["test_accuracy"] < 1.0  # next-token accuracy on the test files
    truth = np.load(tmp_path / "ground_truth.npz")
    assert truth["is_mislabeled"].sum() == 12 and set(truth["corruption"][truth["is_mislabeled"]]) <= set(CORRUPTIONS)
    rows = list(csv_module.DictReader((tmp_path / "scores.csv").open()))
    assert len(rows) == 60 and all(r["document"].split("/")[0].split(".")[0] in ("json", "csv") for r in rows)
    assert all((r["corruption"] != "") == (r["is_mislabeled"] == "1") for r in rows)
    suspects = list(csv_module.DictReader((tmp_path / "suspects.csv").open()))
    assert list(suspects[0])[:4] == ["rank", "index", "document", "first_line"]
    loss = {r["corruption"]: [] for r in rows}
    for r in rows:
        loss[r["corruption"]].append(-float(r["loss"]))
    if "random_bytes" in loss:  # uniform printable bytes cost more than code, even to a model of two epochs
        assert np.mean(loss["random_bytes"]) > np.mean(loss[""])


@pytest.mark.slow
def test_code_lm_runs_with_a_bpe_and_a_centred_j(tmp_path):
    """The tiny run with a BPE of 300 tokens trained on the corpus: the language model's vocabulary is the BPE's
    (model.vocab_size null), and a centred J (objective.centred=true) is the J the replay runs for a language model:
    against the plain J on the same trajectory (a train cache hit), the replay is another (its own cache entry), the
    costates differ from the first interval on and so do the scores. Guard: a centring that is ignored gives the plain
    J's replay, costates and scores exactly."""
    import csv as csv_module

    from pmp_lightning.pipeline import run
    from pmp_lightning.trajectory import load_manifest, network_state

    bpe = ["data.tokenizer._target_=pmp_lightning.data.corpus.BPETokenizer", "+data.tokenizer.vocab_size=300",
           "scoring.scores=[cosine,loss]"]
    metrics = run(make_cfg(tmp_path, *bpe, "objective.centred=true"))
    assert set(metrics["detection"]) >= {"cosine", "loss"} and 0.0 < metrics["test_accuracy"] < 1.0
    snapshots = tmp_path / "snapshots"
    state = network_state(snapshots, load_manifest(snapshots)["snapshots"][0])
    assert state["tokens.weight"].shape[0] == state["head.weight"].shape[0] == 300
    plain = run(make_cfg(tmp_path / "plain", *bpe, "objective.centred=false", f"paths.cache_dir={tmp_path / 'cache'}"))
    assert metrics["costate"]["objective"] == "ce, centred" and plain["costate"]["objective"] == "ce"
    assert plain["cache"]["train"] == metrics["cache"]["train"] and plain["cache"]["replay"] != metrics["cache"]["replay"]
    assert "train" not in plain["cache"]["computed"]  # the same trajectory, replayed with the other J
    assert all(a != pytest.approx(b, rel=1e-6) for a, b in zip(metrics["costate"]["lambda_norms"],
                                                                plain["costate"]["lambda_norms"]))
    cosine = [[float(r["cosine"]) for r in csv_module.DictReader((out / "scores.csv").open())]
              for out in (tmp_path, tmp_path / "plain")]
    assert not np.allclose(*cosine, rtol=1e-6)
    loss = [[r["loss"] for r in csv_module.DictReader((out / "scores.csv").open())] for out in (tmp_path, tmp_path / "plain")]
    assert loss[0] == loss[1]  # θ_T's own scores do not read J


@pytest.mark.slow
def test_a_corpus_refuses_what_needs_labels_before_training(tmp_path):
    from hydra.errors import InstantiationException

    from pmp_lightning.errors import PMPError
    from pmp_lightning.pipeline import run

    for extra, message in ((["baselines.cleanlab=true"], "a corpus has no labels"),
                           (["scoring.by_class=true"], "a corpus has no labels"),
                           (["data.length=64"], "raise model.max_len"),
                           (["pool=test"], "does not apply to a corpus")):
        with pytest.raises((PMPError, ValueError, InstantiationException), match=message):
            run(make_cfg(tmp_path / extra[0].split("=")[0], *extra))
        assert not (tmp_path / extra[0].split("=")[0] / "cache" / "train").exists()  # nothing was trained


def test_a_centred_token_objective_ignores_a_shift_of_every_logit():
    """Centring for a language model's J: w̄ is the target set's mean pull, one vector over the vocabulary, and the
    centred J does not move when every logit at every position shifts by the same vector (documents of unequal length,
    padding included), while the plain J does. The participation weights are the norms of the centred pulls."""
    from pmp_lightning.replay.costate import centred_values, logit_pulls, logit_weights, objective, pull_sum

    torch.manual_seed(0)
    z = torch.randn(5, 7, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (5, 7))
    y[1, 4:], y[3, 2:] = IGNORE, IGNORE
    obj = objective("ce", centred=True)
    mean_pull = pull_sum(logit_pulls(obj, z, y)) / len(z)
    assert mean_pull.shape == (11,)
    shift = torch.zeros(11, dtype=torch.float64, requires_grad=True)
    (centred,) = torch.autograd.grad(centred_values(obj, z + shift, y, mean_pull).mean(), shift)
    (plain,) = torch.autograd.grad(centred_values(obj, z + shift, y, None).mean(), shift)
    assert centred.abs().max() < 1e-15 < plain.abs().max()
    zc = z.clone().requires_grad_(True)
    (pulls,) = torch.autograd.grad(centred_values(obj, zc, y, mean_pull).sum(), zc)
    assert torch.allclose(logit_weights(obj, z, y, mean_pull), pulls.flatten(1).norm(dim=1), rtol=1e-12)


# ------------------------------------------------------------------ the language-model baselines
def test_dsir_prefers_documents_like_the_target():
    """Code windows of one module against random bytes, with another module as the target set."""
    from sklearn.metrics import roc_auc_score

    from pmp_lightning.scores.text import dsir

    target = documents(StdlibSource(["json"]).load(), "window", 128)
    pool = documents(StdlibSource(["csv"]).load(), "window", 128)
    rng = np.random.default_rng(0)
    junk = [type(d)(d.name, CORRUPTIONS["random_bytes"](d.text, rng)) for d in pool[:40]]
    weights = dsir(pool[40:] + junk, target)
    assert roc_auc_score(np.r_[np.ones(len(pool) - 40), np.zeros(40)], weights) > 0.9  # measured 0.98


def test_influence_is_the_gradient_dot_product_at_the_final_model():
    """⟨∇J(θ_T), ∇l_n(θ_T)⟩ with J the target set's mean document loss, against autograd in float64."""
    from types import SimpleNamespace

    from pmp_lightning.replay.costate import objective
    from pmp_lightning.data.base import IndexedDataset
    from pmp_lightning.scores.text import influence

    x, y = _corpus_batch(n=6)
    torch.manual_seed(0)
    net = GPT(max_len=16, dim=16, depth=1, heads=2, tied=False).double().eval()
    dm = SimpleNamespace(pool=IndexedDataset(x[:4], y[:4]), downstream=IndexedDataset(x[4:], y[4:]))
    got = influence(net, objective("ce"), dm, batch_size=3)
    params = list(net.parameters())
    grad_j = torch.autograd.grad(training_loss(net(x[4:]), y[4:]), params)
    for n in range(4):
        g = torch.autograd.grad(training_loss(net(x[n:n + 1]), y[n:n + 1]), params)
        want = sum((a * b).sum() for a, b in zip(grad_j, g))
        assert got[n] == pytest.approx(float(want), rel=1e-9)


# ------------------------------------------------------------------ a labelled text set from the same corpus
def test_package_windows_are_labelled_balanced_and_split_by_file():
    from pmp_lightning.data.corpus import PackageSource

    source = PackageSource(packages=["json", "email", "asyncio"], length=64, per_package=40, seed=0)
    main, test = source.load()
    assert main.x.shape == (120, 64) and main.x.dtype == torch.long and main.y.bincount().tolist() == [40, 40, 40]
    assert test.y.bincount().tolist() == [8, 8, 8] and source.num_classes == 3
    windows = {bytes(row.tolist()) for row in main.x}
    assert not windows & {bytes(row.tolist()) for row in test.x}
    assert source.files["main"] and source.files["test"] and not set(source.files["main"]) & set(source.files["test"])
    texts = dict(StdlibSource(["json", "email", "asyncio"]).load())
    for split, images in (("main", main), ("test", test)):  # every window comes from a file its split read
        read = [texts[name] for name in source.files[split]]
        assert all(any(bytes(row.tolist()) in text for text in read) for row in images.x)
    with pytest.raises(DataConfigError, match="'nonexistent_pkg' has 0 file.*a package needs two at least"):
        PackageSource(packages=["json", "nonexistent_pkg"]).load()


def test_auroc_by_kind_compares_each_kind_with_the_clean_documents():
    from pmp_lightning.report.evaluate import auroc_by_kind

    got = auroc_by_kind({"s": np.array([3.0, 2.0, 1.0, 2.5])}, ["", "", "random_bytes", "fragments"])
    assert got == {"fragments": {"s": 0.5}, "random_bytes": {"s": 1.0}}  # low score = suspect


# ------------------------------------------------------------------ the data scorer
def test_the_data_scorer_learns_what_the_features_hold_and_reads_real_positions_only():
    """The ridge head recovers a γ linear in the features (out of fold) and not one of pure noise; a document's
    features are the mean hidden state over its targets, padding left out."""
    from pmp_lightning.data.base import IndexedDataset
    from pmp_lightning.scores.scorer import document_features, fit_scorer
    from pmp_lightning.task import IGNORE

    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 12))
    gamma = features @ rng.normal(size=12) + 0.1 * rng.normal(size=200)
    _, oof = fit_scorer(features, gamma, seed=0)
    assert np.corrcoef(oof, gamma)[0, 1] > 0.95  # predicted on examples each fold did not see
    noise = rng.normal(size=200)
    assert np.corrcoef(fit_scorer(features, noise, seed=0)[1], noise)[0, 1] < 0.3  # nothing to learn: nothing learned
    torch.manual_seed(0)
    net = GPT(vocab_size=20, max_len=8, dim=8, depth=1, heads=2)
    x = torch.randint(0, 20, (2, 8))
    y = x.clone()
    y[1, 5:] = IGNORE  # the second document has 5 targets
    got = document_features(net, IndexedDataset(x, y))
    with torch.no_grad():
        h = net.hidden(x)
    np.testing.assert_allclose(got[0], h[0].mean(0).double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(got[1], h[1, :5].mean(0).double().numpy(), rtol=1e-5)
    with pytest.raises(SettingError, match="data.wide_size needs the proxy's hidden states .* use model=gpt"):
        document_features(torch.nn.Linear(8, 20), IndexedDataset(x, y))


@pytest.mark.slow
def test_code_lm_with_a_wide_slice_scores_and_selects_it(tmp_path, monkeypatch):
    """The tiny run with a wide slice of 120 documents: the scorer learns the pool's γ, scores the slice beside the
    proxy's loss, DSIR, RHO-LOSS and random, writes each document's scores to wide_scores.csv (named as scores.csv names the
    pool's, the scores metrics.json measured), and each retrain on the slice has the slice's token budget (2 epochs
    of 120 documents in batches of 8: 30 steps)."""
    import csv as csv_module
    import re

    from pmp_lightning.pipeline import run
    from tests.test_pipeline import make_cfg as image_cfg

    from pmp_lightning.scores import text

    retrains = spy_on_retrains(monkeypatch)
    passes, output_stats = [], text.output_stats  # each batch that a network's document losses are computed on

    def counted(net, x, y):
        passes.append((float(sum(p.double().sum() for p in net.parameters())), tuple(x.shape), x.sum().item()))
        return output_stats(net, x, y)

    monkeypatch.setattr(text, "output_stats", counted)
    metrics = run(make_cfg(tmp_path, "data.wide_size=120", "data.max_per_file=null", "scoring.canaries=0",  # two packages' every window
                           "select.fractions=[0.2]", "select.scores=[loss]"))
    assert passes and len(set(passes)) == len(passes)  # no network's losses on a batch twice: θ_T once over the slice
    scorer = metrics["scorer"]
    assert scorer["target"] == "raw" and -1 <= scorer["pool"]["spearman_out_of_fold"] <= 1
    assert scorer["wide"]["size"] == 120 and set(scorer["wide"]["detection"]) == {"scorer", "loss", "dsir", "rho_loss", "random"}
    assert retrains[:4] == [(60, 16), (48, 16), (48, 16), (48, 16)]  # the pool's selection first: whole, oracle, loss, random
    assert retrains[4:] == [(120, 30), (96, 30), *[(96, 30)] * 5]  # the slice: whole, oracle, scorer, loss, dsir,
    assert set(scorer["selection"]["0.2"]) == {"scorer", "loss", "dsir", "rho_loss", "random"}  # rho_loss, random
    from pmp_lightning.cache import train_key_config  # the slice is dealt after the pool: it retrains nothing

    assert train_key_config(make_cfg(tmp_path, "data.wide_size=120")) == train_key_config(make_cfg(tmp_path))
    assert train_key_config(make_cfg(tmp_path, "data.pool_size=50")) != train_key_config(make_cfg(tmp_path))  # guard
    wide = list(csv_module.DictReader((tmp_path / "wide_scores.csv").open()))  # each document's scores, as scores.csv
    pool = list(csv_module.DictReader((tmp_path / "scores.csv").open()))
    assert scorer["wide"]["file"] == "wide_scores.csv" and len(wide) == 120
    assert list(wide[0]) == ["index", "document", "corruption", "is_mislabeled", "scorer", "loss", "dsir", "rho_loss",
                        "random"]
    assert [int(r["index"]) for r in wide] == list(range(120)) and list(pool[0])[:2] == ["index", "document"]
    assert all(re.fullmatch(r"(json|csv)\S*\.py@\d+", r["document"]) for r in wide + pool)
    assert not {r["document"] for r in wide} & {r["document"] for r in pool}  # the slice: documents the proxy never saw
    mask = np.array([r["is_mislabeled"] == "1" for r in wide])
    assert mask.sum() == round(0.2 * 120) and all((r["corruption"] != "") == m for r, m in zip(wide, mask))
    from pmp_lightning.report.evaluate import detection_metrics
    ap = detection_metrics(np.array([float(r["scorer"]) for r in wide]), mask)["ap"]
    assert ap == pytest.approx(scorer["wide"]["detection"]["scorer"]["ap"])  # the scores metrics.json measured
    with pytest.raises(SettingError, match="learns the PMP score raw, which this run does not compute"):
        run(make_cfg(tmp_path / "no_raw", "data.wide_size=120", "scoring.scores=[cosine,loss]"))
    with pytest.raises(SettingError, match="data.wide_size is (the data scorer's wide slice of a corpus|not a setting of "
                                           "pmp_lightning.data.labelled.PoolDataModule)"):  # the latter: config.check_keys
        run(image_cfg(tmp_path / "images", "+data.wide_size=120"))
