"""The mixed-domain corpus (pmp_lightning/data/domains.py, data=domains, +experiment=domains_lm), without training:
the source loads the same texts on every call, holds every domain and every junk kind, names each text by its domain,
leaves the target packages out, and the data module the experiment's config builds sets up with J the target
packages' own files."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pmp_lightning.data.corpus import CorpusDataModule, StdlibSource, top_level
from pmp_lightning.data.domains import DOMAINS, JUNK_KINDS, REAL_DOMAINS, DomainSource, domain_of, junk_kind_of
from pmp_lightning.errors import DataConfigError

ROOT = Path(__file__).resolve().parents[1]
TARGET = ["email", "json", "http"]
SMALL = dict(exclude=TARGET, per_domain=12, per_package=3, junk=2 * len(JUNK_KINDS), junk_bytes=1024)


def package(name: str) -> tuple[str, str]:
    """Where a text of a real domain comes from and its top-level package: ``prose/site/numpy/x.md`` -> ``(prose/site,
    numpy)``, ``stdlib/json/decoder.py`` -> ``(stdlib, json)``."""
    domain, rest = name.split("/", 1)
    if domain == "prose":
        origin, rest = rest.split("/", 1)
        domain = f"prose/{origin}"
    return domain, top_level(rest)


@pytest.fixture(scope="module")
def small():
    """A small source (12 files per real domain, two junk texts of each kind) and what it loads."""
    source = DomainSource(**SMALL)
    return source, source.load()


def test_the_source_loads_the_same_texts_every_time(small):
    """Two sources of the same settings load the same texts in the same order; another seed draws other files and
    other junk."""
    source, texts = small
    assert DomainSource(**SMALL).load() == texts
    other = dict(DomainSource(**{**SMALL, "seed": 1}).load())
    assert other.keys() != dict(texts).keys()
    assert all(other[n] != t for n, t in texts if n.startswith("junk/"))


def test_every_domain_is_held_and_named_by_its_prefix(small):
    """Every name starts with its domain and a slash; each real domain holds its per_domain files (the headers, the
    documentation and the code of this install are more than 12 each), the junk its count; describe() says so."""
    source, texts = small
    names = [n for n, _ in texts]
    assert len(set(names)) == len(names)
    assert all(n.split("/", 1)[0] in DOMAINS and len(n.split("/", 1)) == 2 for n in names)
    counts = Counter(domain_of(n) for n in names)
    assert counts == {**{d: 12 for d in REAL_DOMAINS}, "junk": 2 * len(JUNK_KINDS)} == source.counts
    assert all(f"{d} {n}" in source.describe() for d, n in counts.items())
    assert "email, json, http" in source.describe()
    assert all(n.endswith(".py") for n in names if domain_of(n) in ("stdlib", "site"))
    assert all(n.endswith(".h") for n in names if domain_of(n) == "c")
    assert all(n.startswith(("prose/stdlib/", "prose/site/")) for n in names if domain_of(n) == "prose")
    assert domain_of("site/numpy/core/fromnumeric.py@256") == "site" and domain_of("junk/base64/003@0") == "junk"
    assert domain_of("email/utils.py@0") == "other" and domain_of("line 3") == "other"


def test_texts_are_utf8_without_copies_and_packages_capped(small):
    """Every text is UTF-8 without NUL bytes, at least min_bytes long (the junk aside, which is generated), no two
    texts are equal, and no top-level package gives a domain more than per_package files."""
    source, texts = small
    for name, text in texts:
        text.decode("utf-8")
        assert b"\0" not in text
        assert domain_of(name) == "junk" or len(text) >= source.min_bytes
    assert len({t for _, t in texts}) == len(texts)
    groups = Counter(package(n) for n, _ in texts if domain_of(n) in ("stdlib", "site", "prose"))
    assert max(groups.values()) <= SMALL["per_package"]


@pytest.mark.filterwarnings("ignore:.*not UTF-8 text")  # the whole standard library holds a file or two that are not
def test_the_target_packages_are_left_out(small):
    """No text of the pool's source is a file of an excluded package, by name or by content; without exclude, the
    same draw can take them (the guard that exclude is what leaves them out)."""
    _, texts = small
    assert not [n for n, _ in texts if package(n)[0] in ("stdlib", "prose/stdlib") and package(n)[1] in TARGET]
    target = {t for _, t in StdlibSource(TARGET).load()}
    assert not [n for n, t in texts if t in target]
    everything = DomainSource(exclude=[], per_domain={"stdlib": 2000}, per_package=2000, junk=0).load()
    assert {package(n)[1] for n, _ in everything} >= set(TARGET)


def test_every_junk_kind_is_present_and_deterministic(small):
    """The junk kinds the module's docstring names are all there, in turn, each ASCII text of 0.5 to 1.5 times
    junk_bytes; each kind looks like what it says."""
    _, texts = small
    junk = {n: t for n, t in texts if domain_of(n) == "junk"}
    assert Counter(junk_kind_of(n) for n in junk) == {k: 2 for k in JUNK_KINDS}
    assert junk_kind_of("stdlib/os.py") is None
    for name, text in junk.items():
        assert max(text) < 128 and SMALL["junk_bytes"] // 2 <= len(text) <= SMALL["junk_bytes"] * 3 // 2, name
    by_kind = {junk_kind_of(n): t for n, t in sorted(junk.items())}
    assert set(by_kind["digit_table"]) <= set(b"0123456789. \n")
    assert b"\n" not in by_kind["minified"]
    assert len(set(by_kind["repeated_line"].split(b"\n")[:-1])) == 1
    assert by_kind["hex_dump"].startswith(b"00000000: ")
    assert set(by_kind["base64"]) <= set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


def test_per_domain_takes_a_mapping_and_bad_settings_are_named():
    """per_domain as {domain: files}: the domains it does not name hold none. A package that the standard library
    does not hold, a domain that does not exist and a negative count are refused, naming the setting."""
    source = DomainSource(exclude=["json"], per_domain={"stdlib": 3, "c": 2}, junk=0)
    assert Counter(domain_of(n) for n, _ in source.load()) == {"stdlib": 3, "c": 2}
    with pytest.raises(DataConfigError, match=r"exclude=\['nosuchpackage'\]: \['nosuchpackage'\] is no top-level"):
        DomainSource(exclude=["nosuchpackage"], per_domain=1, junk=0).load()
    with pytest.raises(DataConfigError, match=r"per_domain names \['code'\]; the domains are stdlib, site, prose, c"):
        DomainSource(per_domain={"code": 3})
    with pytest.raises(DataConfigError, match=r"data.source.junk=-1: give an integer ≥ 0"):
        DomainSource(junk=-1)


def compose_domains(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from pmp_lightning.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["+experiment=domains_lm", *overrides, "logger=none",
                                            f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path}",
                                            f"paths.cache_dir={tmp_path / 'cache'}"])


def test_the_experiments_data_module_sets_up(tmp_path):
    """+experiment=domains_lm builds a corpus data module whose pool comes from the DomainSource and whose target set
    (data.downstream, from downstream=domains_target) is the excluded packages' own files, following
    data.source.exclude; the test set is held out of it by file, the pool shares no document with either, and the
    settings pass the run's checks (keys included)."""
    from pmp_lightning.config import check_settings
    from pmp_lightning.policy import resolve as scoring_defaults

    try:  # where the data's one builder lives: data/base.py, formerly data/images.py
        from pmp_lightning.data.base import datamodule_from_config
    except ImportError:
        from pmp_lightning.data.images import datamodule_from_config

    cfg = compose_domains(tmp_path, "data.source.exclude=[json]", "data.source.per_domain=10", "data.source.junk=14",
                          "data.source.junk_bytes=1024", "data.length=32", "data.pool_size=80", "data.test_size=16",
                          "data.max_per_file=4", "model.max_len=32")
    assert cfg.noise.kind == "none" and list(cfg.select.fractions) == [0.3, 0.5]
    check_settings(cfg)
    dm = datamodule_from_config(scoring_defaults(cfg))
    assert isinstance(dm, CorpusDataModule) and isinstance(dm.source, DomainSource)
    assert isinstance(dm.trusted, StdlibSource) and dm.trusted.packages == ["json"]
    dm.setup()
    assert len(dm.pool) == 80 and len(dm.test_set) == 16 and len(dm.downstream) > 0
    assert all(domain_of(d.name) in DOMAINS for d in dm.pool_documents)
    assert all(d.name.startswith("json/") for d in [*dm.target_documents, *dm.test_documents])
    files = lambda docs: {d.name.split("@")[0] for d in docs}  # noqa: E731
    assert not files(dm.target_documents) & files(dm.test_documents)
    pool = {d.text for d in dm.pool_documents}
    assert not pool & {d.text for d in [*dm.target_documents, *dm.test_documents]}
    # noise=none: the source's own junk is the ground truth, exactly the documents named junk/<kind>/...
    junk = np.array([d.name.startswith("junk/") for d in dm.pool_documents])
    assert junk.any() and np.array_equal(dm.is_mislabeled, junk) and "warning" not in dm.downstream_note
    assert {k for k in dm.corruption_kind if k} <= set(JUNK_KINDS)
