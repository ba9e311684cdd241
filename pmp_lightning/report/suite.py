"""A suite of settings drawn before any rule is fitted (issue 39, item 4): a seeded generator of rows (data, model,
noise, pool, J path), a runner that runs each row × seed as its own ``run.py`` process, and the table of what the
default reached on each row.

    python -m pmp_lightning.report.suite draw --seed 1 --rows 16 --out docs/suites/development.yaml
    python -m pmp_lightning.report.suite run docs/suites/development.yaml --out outputs/suites/development [--dry-run]
    python -m pmp_lightning.report.suite table docs/suites/development.yaml --runs outputs/suites/development \\
        --out docs/suite_development.md

**draw** writes the suite as YAML: the generator's version, its seed, and per row a name, the drawn axes, the Hydra
overrides, the ``cheap`` flag, the estimated minutes of one run and its seeds (``CHEAP_SEEDS`` where cheap, else
``EXPENSIVE_SEEDS``). The same seed and row count give the same file byte for byte; the draw uses nothing but
``random.Random(seed).random()``, whose sequence Python keeps across versions. The axes and what constrains them are
``DATASETS`` and ``MODELS`` below: a model only on data it can take (the reported CNN on 28 × 28 images, the ViT on
square ones, the text classifier on token ids, the language model on a corpus), label noise on labelled data and
corrupted documents on a corpus, J drawn beside the pool or a trusted set where the data has one.

**run** runs every row × seed in turn, as ``python run.py <overrides> seed=<s> logger=none
trainer.enable_progress_bar=false hydra.run.dir=<out>/<row>/seed<s>`` from the project's root (the overrides'
``../shared/data`` is relative to it), its output in ``<out>/<row>/seed<s>.out``; a run whose ``metrics.json``
exists is skipped, so a killed suite resumes where it stopped (each run resumes from its cache too).

**table** reads each run's ``metrics.json`` and writes, per row (mean over its seeds): the default's AP (the score
``suspects.rank_by`` names, the one suspects.csv is ranked by), the best PMP column (``PMP_VARIANTS``,
``CLASS_VARIANTS`` and ``FITTED_VARIANTS``) and the best baseline (every other score but ``random`` and the default
itself), the regret (best PMP column − default), the ratio default / best baseline and the cost relative to one
replay, then the summary: median and largest regret, the share of rows at ≥ ``RATIO_TARGET`` of the best baseline
and the rows below it.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GENERATOR_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # where run.py and conf/ live
SHARED_DATA = "../shared/data"  # MNIST and Fashion-MNIST, offline; relative to PROJECT_ROOT, where run() starts
CHEAP_SEEDS, EXPENSIVE_SEEDS = (0, 1, 2), (0,)
CHEAP_MINUTES = 4.0  # a row whose run is estimated at this or less is cheap: 3 seeds, about 12 minutes
RUN_OVERRIDES = ("logger=none", "trainer.enable_progress_bar=false")  # every run's, after the row's own
RATIO_TARGET = 0.95  # the bar: the default at ≥ 0.95× the best baseline's AP


# ----------------------------------------------------------------------------- the axes
@dataclass(frozen=True)
class Pool:
    """A pool's sizes: pool=train scores ``train_pool`` examples it trains on; pool=holdout scores ``holdout_pool``
    after training on ``holdout_train`` others."""

    train_pool: int
    holdout_pool: int
    holdout_train: int


@dataclass(frozen=True)
class Data:
    """One data set of the suite: its overrides, its kind, its sizes and the trusted J it offers.

    ``trusted``: the downstream config of its trusted set (None: J drawn only), with the sizes it may take
    (``trusted_sizes``: 200 cannot spare the canaries' 80 examples under ``policy.TRUSTED_SHARE``, 1,000 can) and the
    overrides it needs; ``pixels``: the input's cost against a 28 × 28 image (or a 128-byte window)."""

    name: str
    overrides: tuple[str, ...]
    corpus: bool
    models: tuple[str, ...]
    classes: int
    sizes: Pool
    epochs: int
    test_size: int
    j_size: int  # J drawn beside the pool (data.downstream_size)
    trusted: str | None = None
    trusted_sizes: tuple[int | None, ...] = ()
    trusted_overrides: tuple[str, ...] = ()
    pixels: float = 1.0
    target_size: int = 0  # a trusted set of no set size (domains_target): about this many documents, for the estimate
    note: str = ""


# Sizes: the check_* experiments' (pool=train 4,000; held out 1,000 scored after training on 3,000; J 200; test 2,000;
# 10 epochs), whose runs docs/results.md times at 2-5 minutes on 2 cores; the corpora's are code_lm's and domains_lm's.
DATASETS: dict[str, Data] = {d.name: d for d in (
    Data("mnist", ("data=mnist", f"data.source.root={SHARED_DATA}", "data.downstream_size=200", "data.test_size=2000"),
         corpus=False, models=("cnn", "mlp", "resnet", "vit"), classes=10, sizes=Pool(4000, 1000, 3000), epochs=10,
         test_size=2000, j_size=200, trusted="mnist_test", trusted_sizes=(200, 1000),
         trusted_overrides=(f"data.downstream.source.root={SHARED_DATA}",),
         note="torchvision MNIST; trusted J: downstream=mnist_test, MNIST's test split"),
    Data("fashion_mnist", ("data=fashion_mnist", f"data.source.root={SHARED_DATA}", "data.downstream_size=200",
                           "data.test_size=2000"),
         corpus=False, models=("cnn", "mlp", "resnet", "vit"), classes=10, sizes=Pool(4000, 1000, 3000), epochs=10,
         test_size=2000, j_size=200, trusted="test_split", trusted_sizes=(200, 1000),
         note="torchvision Fashion-MNIST; trusted J: downstream=test_split, from what the 2,000 test images leave"),
    # 100 classes, 28 × 56: 12,000 pairs leave J (2,000: every class, conf/data/mnist_pairs.yaml), 80 canaries, and a
    # pool of 4,000 (40 a class) or a held-out pool of 2,000 beside 6,000 training pairs; 4,000 test pairs, 2,000 the
    # test set and the rest for a trusted J of 2,000
    Data("mnist_pairs", ("data=mnist_pairs", f"data.source.root={SHARED_DATA}", "data.source.size=12000",
                         "data.source.test_size=4000", "data.downstream_size=2000", "data.test_size=2000"),
         corpus=False, models=("mlp", "resnet"), classes=100, sizes=Pool(4000, 2000, 6000), epochs=10, test_size=2000,
         j_size=2000, trusted="test_split", trusted_sizes=(2000,), pixels=2.0,
         note="100 classes of 1 × 28 × 56: no cnn (28 × 28 only), no vit (square images only)"),
    # 3,000 windows of 128 bytes (300 a package) and 600 test windows from other files; a trusted J of 200 from those
    # leaves a test set of 300
    Data("code_packages", ("data=code_packages",),
         corpus=False, models=("text",), classes=10, sizes=Pool(2000, 1000, 1600), epochs=10, test_size=600,
         j_size=200, trusted="test_split", trusted_sizes=(200,), trusted_overrides=("data.test_size=300",),
         note="token ids: the text classifier only (the code_packages experiment's: 2 blocks on byte tokens)"),
    Data("code", ("data=code", "objective=ce"),
         corpus=True, models=("gpt",), classes=0, sizes=Pool(2000, 1000, 2000), epochs=5, test_size=200,
         j_size=200,
         note="the standard library's source as 128-byte windows (code_lm's sizes); J from other files; objective=ce "
              "as every shipped corpus experiment and the README's own-corpus command"),
    Data("domains", ("data=domains", "data.source.junk=0", "objective=ce"),
         corpus=True, models=("gpt",), classes=0, sizes=Pool(1000, 1000, 1000), epochs=3, test_size=200,
         j_size=200, trusted="domains_target", trusted_sizes=(None,), target_size=4600,
         note="a mixed-domain pool (stdlib, site-packages, prose, C); its own junk is left out (data.source.junk=0), "
              "as no ground truth marks it yet; trusted J: downstream=domains_target, the excluded packages' files"),
)}

# per model: (training seconds per 1,000 examples per epoch, replay seconds per 1,000 scored examples per snapshot) on
# 2 CPU cores, and whether it is stacked (canaries and one replay per class on labelled data, policy.resolve).
# From: the reported CNN's default experiment (README: 3,800 examples, training 66 s, replay 90 s); the ResNet and ViT
# on 4,000 Fashion-MNIST images (docs/results.md: training 24 s and 22 s, replays 15-40 s and 30 s, class replays
# 80-170 s); code_lm's GPT (2,000 windows, 5 epochs: training 15 s, replay 30 s, LM baselines 8 s); the MLP and the
# text classifier estimated from their size against those.
MODELS: dict[str, tuple[float, float, bool, tuple[str, ...]]] = {
    "cnn": (1.7, 2.2, False, ("model=cnn",)),
    "mlp": (0.2, 0.3, False, ("model=mlp",)),
    "resnet": (0.6, 0.9, True, ("model=resnet",)),
    "vit": (0.55, 0.7, True, ("model=vit",)),
    "text": (1.5, 2.5, True, ("model=text", "model.vocab_size=256", "model.max_len=128", "model.depth=2")),
    "gpt": (1.5, 2.5, False, ("model=gpt",)),
}
START_SECONDS = 20  # imports, the data, the model check
# the class replays as today's code runs them (pipeline.replay_stage): together one pass over the pool, and per class
# the snapshots' Hessian-vector products, ∇J and set-up again, about this share of a whole replay each: 4x the replay
# at 10 classes (measured 3-7x, docs/results.md; 3.9x in issue 39), 31x at 100
CLASS_REPLAY_FIXED = 0.3
LM_BASELINES_PER_1000 = 4.0  # seconds: DSIR, RHO-LOSS and the influence on a corpus

LABEL_NOISE = {"symmetric": (0.2, 0.3, 0.4), "pairflip": (0.2, 0.3), "confusion": (0.2, 0.3)}
CORRUPTION_RATES = (0.1, 0.2, 0.3)
# the corruption kinds of pmp_lightning/data/corruption.py, written here so that a suite never changes with the registry
CORRUPTION_KINDS = ("shuffled_lines", "shuffled_tokens", "random_bytes", "repeated_line", "fragments")
CORRUPTION_COUNTS = (2, 3, 5)  # how many kinds a corpus row's junk is made of
POOLS = ("train", "holdout")
J_PATHS = ("drawn", "trusted")


@dataclass
class Row:
    name: str
    axes: dict
    overrides: list[str]
    minutes: float
    cheap: bool = field(init=False)
    seeds: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        self.cheap = self.minutes <= CHEAP_MINUTES
        self.seeds = CHEAP_SEEDS if self.cheap else EXPENSIVE_SEEDS


class Draw:
    """Choices by ``random.Random(seed).random()`` alone (its sequence is Python's promise; ``choice`` and ``shuffle``
    are not)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def index(self, n: int) -> int:
        return min(int(self.rng.random() * n), n - 1)

    def pick(self, options):
        options = list(options)
        return options[self.index(len(options))]

    def least_used(self, options, counts: dict):
        """One of the options used least so far, at random among those."""
        options = list(options)
        fewest = min(counts.get(o, 0) for o in options)
        return self.pick([o for o in options if counts.get(o, 0) == fewest])

    def shuffled(self, items) -> list:
        items = list(items)
        for i in range(len(items) - 1, 0, -1):  # Fisher-Yates on random()
            j = self.index(i + 1)
            items[i], items[j] = items[j], items[i]
        return items

    def subset(self, items, k: int) -> list:
        chosen = set(self.shuffled(items)[:k])
        return [i for i in items if i in chosen]  # in the registry's order


def draw(seed: int, rows: int) -> list[Row]:
    """``rows`` settings: the data sets in turn in a shuffled order (every one as often as the count allows), then per
    row the model, noise kind, pool and J path used least so far (the model and noise over the suite, the pool and J
    path within the data set), each at random among the least used, and a rate (and a corpus's corruption kinds) at
    random. A row drawn twice is drawn again."""
    if rows < 1:
        raise ValueError(f"--rows {rows}: draw at least one row")
    d = Draw(seed)
    order: list[str] = []
    while len(order) < rows:
        order += d.shuffled(DATASETS)
    counts: dict[str, dict] = {"model": {}, "noise": {}}
    per_data: dict[str, dict[str, dict]] = {name: {"pool": {}, "j": {}} for name in DATASETS}
    drawn: list[Row] = []
    for name in order[:rows]:
        data = DATASETS[name]
        for _ in range(100):
            row = _draw_row(d, data, counts, per_data[name])
            if all(row.axes != other.axes for other in drawn):
                break
        for axis in ("model", "noise"):
            counts[axis][row.axes[axis]] = counts[axis].get(row.axes[axis], 0) + 1
        for axis in ("pool", "j"):
            per_data[name][axis][row.axes[axis]] = per_data[name][axis].get(row.axes[axis], 0) + 1
        drawn.append(row)
    return _unique_names(drawn)


def _draw_row(d: Draw, data: Data, counts: dict, own: dict) -> Row:
    model = d.least_used(data.models, counts["model"])
    pool = d.least_used(POOLS, own["pool"])
    j = d.least_used(J_PATHS if data.trusted else ("drawn",), own["j"])
    axes = {"data": data.name, "model": model}
    overrides = [*data.overrides, *MODELS[model][3]]
    if data.corpus:
        rate = d.pick(CORRUPTION_RATES)
        kinds = d.subset(CORRUPTION_KINDS, d.pick(CORRUPTION_COUNTS))
        axes.update(noise="corrupt", rate=rate, kinds=kinds)
        overrides += ["noise=corrupt", f"noise.rate={rate}", f"noise.kinds=[{','.join(kinds)}]"]
    else:
        kind = d.least_used(LABEL_NOISE, counts["noise"])
        rate = d.pick(LABEL_NOISE[kind])
        axes.update(noise=kind, rate=rate)
        overrides += [f"noise={kind}", f"noise.rate={rate}"]
    axes["pool"] = pool
    sizes = data.sizes
    if pool == "train":
        overrides += ["pool=train", f"data.pool_size={sizes.train_pool}"]
    else:
        overrides += ["pool=holdout", f"data.pool_size={sizes.holdout_pool}", f"data.train_size={sizes.holdout_train}"]
    axes["j"] = j
    if j == "trusted":
        size = d.pick(data.trusted_sizes)
        axes["j_size"] = size
        overrides += [f"downstream={data.trusted}", *data.trusted_overrides]
        if size is not None:
            overrides.append(f"data.downstream.size={size}")
    overrides.append(f"trainer.max_epochs={data.epochs}")
    j_size = (axes.get("j_size") or data.target_size) if j == "trusted" else data.j_size
    return Row(_name(axes), axes, overrides, estimate_minutes(data, model, pool, axes.get("noise"), j_size))


def estimate_minutes(data: Data, model: str, pool: str, noise: str | None, j_size: int) -> float:
    """One run's minutes on 2 CPU cores by ``MODELS``' rates: training, the replay (one more snapshot than epochs) with
    ∇J over J's ``j_size`` examples at each, the class replays of a stacked network on labelled data, a corpus's LM
    baselines and noise=confusion's reference classifier (trained on the test set)."""
    train_rate, replay_rate, stacked, _ = MODELS[model]
    sizes = data.sizes
    trained, scored = (sizes.train_pool, sizes.train_pool) if pool == "train" else (sizes.holdout_train, sizes.holdout_pool)
    train = train_rate * data.pixels * trained / 1000 * data.epochs
    replay = (replay_rate * scored + train_rate * j_size) * data.pixels / 1000 * (data.epochs + 1)
    classes = 0.0
    if stacked and not data.corpus:
        classes = replay * (1 + CLASS_REPLAY_FIXED * data.classes)
    extra = LM_BASELINES_PER_1000 * scored / 1000 if data.corpus else 0.0
    if noise == "confusion":
        extra += train_rate * data.pixels * data.test_size / 1000 * data.epochs
    return round((START_SECONDS + train + replay + classes + extra) / 60, 1)


def _name(axes: dict) -> str:
    noise = f"{axes['noise']}{round(axes['rate'] * 100)}"
    if axes["noise"] == "corrupt":
        noise += f"x{len(axes['kinds'])}"
    j = "drawnJ"
    if axes["j"] == "trusted":
        j = DATASETS[axes["data"]].trusted + ("" if axes["j_size"] is None else str(axes["j_size"]))
    return "-".join([axes["data"], axes["model"], noise, axes["pool"], j])


def _unique_names(rows: list[Row]) -> list[Row]:
    seen: dict[str, int] = {}
    for row in rows:
        seen[row.name] = seen.get(row.name, 0) + 1
        if seen[row.name] > 1:
            row.name = f"{row.name}-{seen[row.name]}"
    return rows


# ----------------------------------------------------------------------------- the suite file
def suite_yaml(seed: int, rows: list[Row]) -> str:
    """The suite as YAML, written by hand so that its bytes depend on nothing but the rows (strings as JSON strings,
    which YAML reads as they are)."""
    q = json.dumps
    cheap = sum(r.cheap for r in rows)
    runs = sum(len(r.seeds) for r in rows)
    minutes = sum(r.minutes * len(r.seeds) for r in rows)
    lines = [
        "# A suite of settings drawn before any rule is fitted (issue 39, item 4). Written by",
        f"#   python -m pmp_lightning.report.suite draw --seed {seed} --rows {len(rows)} --out <this file>",
        "# Do not edit: draw again (the same seed gives these bytes). Run it with",
        "#   python -m pmp_lightning.report.suite run <this file> --out <dir>",
        f"# {len(rows)} rows, {cheap} cheap ({len(CHEAP_SEEDS)} seeds each) and {len(rows) - cheap} not "
        f"({len(EXPENSIVE_SEEDS)} seed): {runs} runs, about {minutes:.0f} minutes on 2 CPU cores by the generator's "
        "estimate.",
        "# The axes (pmp_lightning/report/suite.py: DATASETS, MODELS): per data set the models that can take it, then",
        "# noise (label noise: " + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in LABEL_NOISE.items())
        + f"; a corpus: noise=corrupt at {'/'.join(map(str, CORRUPTION_RATES))}",
        f"# of {'/'.join(map(str, CORRUPTION_COUNTS))} of the kinds {', '.join(CORRUPTION_KINDS)}), pool (train, holdout) "
        "and J (drawn, or the trusted set):",
        *(f"#   {d.name}: {', '.join(d.models)}; {d.note}" for d in DATASETS.values()),
        f"generator: {q('pmp_lightning.report.suite')}",
        f"generator_version: {GENERATOR_VERSION}",
        f"seed: {seed}",
        "rows:",
    ]
    for row in rows:
        axes = ", ".join(f"{k}: {_scalar(v)}" for k, v in row.axes.items())
        lines += [f"  - name: {q(row.name)}",
                  f"    cheap: {str(row.cheap).lower()}",
                  f"    est_minutes: {row.minutes}",
                  f"    seeds: [{', '.join(map(str, row.seeds))}]",
                  f"    axes: {{{axes}}}",
                  "    overrides:",
                  *(f"      - {q(o)}" for o in row.overrides)]
    return "\n".join(lines) + "\n"


def _scalar(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return json.dumps(value)


def load_suite(path: Path) -> dict:
    import yaml

    suite = yaml.safe_load(Path(path).read_text())
    if not isinstance(suite, dict) or "rows" not in suite or "generator_version" not in suite:
        raise ValueError(f"{path} is not a suite file (python -m pmp_lightning.report.suite draw writes them)")
    names = [r["name"] for r in suite["rows"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names repeat")
    return suite


# ----------------------------------------------------------------------------- run
def run_command(row: dict, seed: int, out: Path, python: str = sys.executable) -> list[str]:
    return [python, "run.py", *row["overrides"], f"seed={seed}", *RUN_OVERRIDES,
            f"hydra.run.dir={Path(out).resolve() / row['name'] / f'seed{seed}'}"]


def run_suite(suite: dict, out: Path, only: list[str] | None = None, dry_run: bool = False, python: str = sys.executable,
              say=print) -> int:
    """Each row × seed in turn (``only``: those rows); runs with a metrics.json are skipped. Returns how many failed."""
    rows = suite["rows"]
    if only:
        unknown = sorted(set(only) - {r["name"] for r in rows})
        if unknown:
            raise ValueError(f"--only {', '.join(unknown)}: no such row; the rows: {', '.join(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in only]
    out = Path(out).resolve()
    jobs = [(row, seed) for row in rows for seed in row["seeds"]]
    failed = 0
    if dry_run:
        say(f"# {len(jobs)} runs, from {PROJECT_ROOT}")
    for n, (row, seed) in enumerate(jobs, start=1):
        command = run_command(row, seed, out, python)
        run_dir = out / row["name"] / f"seed{seed}"
        if dry_run:
            say(shlex.join(command))
            continue
        if (run_dir / "metrics.json").is_file():
            say(f"[{n}/{len(jobs)}] skip {row['name']} seed {seed}: {run_dir / 'metrics.json'} exists")
            continue
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_file = run_dir.parent / f"seed{seed}.out"
        say(f"[{n}/{len(jobs)}] start {row['name']} seed {seed} (estimated {row.get('est_minutes', '?')} min); "
            f"output in {log_file}")
        start = time.perf_counter()
        with open(log_file, "w") as log:
            rc = subprocess.run(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        ok = rc == 0 and (run_dir / "metrics.json").is_file()
        failed += not ok
        say(f"[{n}/{len(jobs)}] {'done' if ok else f'FAILED (exit {rc})'} {row['name']} seed {seed}: {seconds:.0f} s")
    if not dry_run:
        say(f"{len(jobs) - failed} of {len(jobs)} runs have their metrics.json" + (f"; {failed} failed" if failed else ""))
    return failed


# ----------------------------------------------------------------------------- table
def score_families() -> tuple[set[str], set[str]]:
    """The PMP columns and the columns that are no baseline (the default ``auto`` and the random control)."""
    from pmp_lightning.scores.registry import CLASS_VARIANTS, FITTED_VARIANTS, PMP_VARIANTS

    return set(PMP_VARIANTS) | set(CLASS_VARIANTS) | set(FITTED_VARIANTS), {"auto", "random"}


def default_score(metrics: dict) -> str:
    """The score the run ranks suspects by (metrics.json's ``suspects.rank_by``); else ``auto`` if computed, else the
    cosine."""
    rank_by = (metrics.get("suspects") or {}).get("rank_by")
    if rank_by:
        return rank_by
    return "auto" if "auto" in metrics.get("detection", {}) else "cosine"


def replay_cost(metrics: dict) -> float | None:
    """(replay + class replays + the canaries' extra work) seconds / replay seconds, from ``cost_s``; the canaries'
    keys are any that start with ``canar`` (none today: the canaries ride in the replay itself)."""
    cost = metrics.get("cost_s") or {}
    replay = cost.get("replay")
    if not replay:
        return None
    extra = sum(v for k, v in cost.items() if v and (k == "class_replay" or k.startswith("canar")))
    return (replay + extra) / replay


@dataclass
class RowResult:
    name: str
    seeds: int = 0
    default: list[str] = field(default_factory=list)
    default_ap: float = math.nan
    best_pmp: str = ""
    best_pmp_ap: float = math.nan
    best_baseline: str = ""
    best_baseline_ap: float = math.nan
    cost: float = math.nan
    missing: list[int] = field(default_factory=list)

    @property
    def regret(self) -> float:
        return self.best_pmp_ap - self.default_ap

    @property
    def ratio(self) -> float:
        return self.default_ap / self.best_baseline_ap if self.best_baseline_ap else math.nan


def finished(row: dict, runs: Path) -> tuple[dict[Path, dict], list[int]]:
    """The row's finished runs (each run directory with its metrics.json, read) and the seeds that have none."""
    done, missing = {}, []
    for seed in row["seeds"]:
        run_dir = Path(runs) / row["name"] / f"seed{seed}"
        if (run_dir / "metrics.json").is_file():
            done[run_dir] = json.loads((run_dir / "metrics.json").read_text())
        else:
            missing.append(seed)
    return done, missing


def row_result(row: dict, runs: Path, done: tuple[dict[Path, dict], list[int]] | None = None) -> RowResult:
    """Mean over the row's seeds: each column's AP is averaged over the seeds, then the best PMP column and the best
    baseline are the best of those means (one column each, named). ``done``: the row's ``finished`` runs, if read."""
    pmp, not_baselines = score_families()
    result = RowResult(row["name"])
    runs_read, result.missing = done or finished(row, runs)
    metrics = [m for m in runs_read.values() if m.get("detection")]
    if not metrics:
        return result
    result.seeds = len(metrics)
    defaults = [default_score(m) for m in metrics]
    result.default = list(dict.fromkeys(defaults))
    result.default_ap = _mean([m["detection"][d]["ap"] for m, d in zip(metrics, defaults) if d in m["detection"]])
    columns = set.intersection(*(set(m["detection"]) for m in metrics))
    means = {c: _mean([m["detection"][c]["ap"] for m in metrics]) for c in columns}
    best = lambda names: max(sorted(names), key=lambda c: means[c]) if names else ""  # noqa: E731 — ties: by name
    result.best_pmp = best([c for c in means if c in pmp])
    baselines = [c for c in means if c not in pmp and c not in not_baselines and c not in result.default]
    result.best_baseline = best(baselines)
    result.best_pmp_ap = means.get(result.best_pmp, math.nan)
    result.best_baseline_ap = means.get(result.best_baseline, math.nan)
    costs = [c for c in (replay_cost(m) for m in metrics) if c is not None]
    result.cost = _mean(costs) if costs else math.nan
    return result


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return math.nan if n == 0 else values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def suite_table(suite: dict, runs: Path, suite_name: str = "") -> tuple[str, list[RowResult]]:
    """The markdown table and summary, and the rows' results."""
    results = [row_result(row, runs) for row in suite["rows"]]
    cheap = {r["name"]: r.get("cheap") for r in suite["rows"]}
    lines = [f"# Suite {suite_name}".rstrip(), "",
             ("Hand-written rows" if suite.get("seed") is None else
              f"Generator version {suite['generator_version']}, seed {suite['seed']}") + f", {len(results)} rows; runs from "
             f"`{runs}`. AP: mean over the row's seeds (a column's mean, then the best column of those). Regret: best "
             f"PMP column − default. Cost: (replay + class replays + canaries' extra) / replay seconds.", "",
             "| row | seeds | default | default AP | best PMP column | AP | best baseline | AP | regret | "
             "default / best baseline | cost (× replay) |",
             "| --- | ---: | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        seeds = f"{r.seeds}" + ("" if cheap[r.name] is None else " (cheap)" if cheap[r.name] else "")
        if r.missing:
            seeds += f", missing {', '.join(map(str, r.missing))}"
        lines.append(f"| {r.name} | {seeds} | {', '.join(r.default) or '–'} | {_f(r.default_ap)} | {r.best_pmp or '–'} | "
                     f"{_f(r.best_pmp_ap)} | {r.best_baseline or '–'} | {_f(r.best_baseline_ap)} | {_f(r.regret)} | "
                     f"{_f(r.ratio, 2)} | {_f(r.cost, 2)} |")
    done = [r for r in results if r.seeds and not math.isnan(r.default_ap)]
    regrets = [r.regret for r in done if not math.isnan(r.regret)]
    ratios = [r for r in done if not math.isnan(r.ratio)]
    below = [r for r in ratios if r.ratio < RATIO_TARGET]
    over = [r for r in done if not math.isnan(r.regret) and r.regret > 0.05]
    lines += ["", "## Summary", "",
              f"- rows with results: {len(done)} of {len(results)}"
              + (f" (none yet: {', '.join(r.name for r in results if r not in done)})" if len(done) < len(results) and
                 len(results) - len(done) <= 8 else ""),
              f"- median regret: {_f(_median(regrets))}; max regret: {_f(max(regrets) if regrets else math.nan)}"
              + (f" ({max(done, key=lambda r: r.regret if not math.isnan(r.regret) else -1).name})" if regrets else ""),
              f"- rows with regret > 0.05: {', '.join(r.name for r in over) or 'none'}",
              f"- share of rows with default / best baseline ≥ {RATIO_TARGET}: "
              + (f"{(len(ratios) - len(below)) / len(ratios):.0%} ({len(ratios) - len(below)} of {len(ratios)})"
                 if ratios else "–"),
              f"- rows below {RATIO_TARGET}: " + (", ".join(f"{r.name} ({r.ratio:.2f})" for r in below) or "none")]
    return "\n".join(lines) + "\n", results


# ----------------------------------------------------------------------------- fit
# Written down before the development suite's results were read (issue 39, item 2): every rule of policy.RULES is
# replayed on every run's recorded canaries; the one with the lowest mean regret over the rows wins (ties: the lower
# largest regret). FALLBACK, the incumbent a run without canaries takes, is the whole-J PMP variant with the highest
# mean over the rows of its AP / the row's best PMP column's AP. The class replays stay on by default only where
# they lower the winning rule's mean regret by more than CLASS_WORTH (they cost 2.5x a replay at 10 classes).
CLASS_WORTH = 0.005


@dataclass
class Run:
    """One finished run, as the fit reads it: each column's pool scores and AP, the ground truth, and the canaries'
    recorded inputs (None without canaries)."""

    ap: dict[str, float]
    pool: dict  # column name -> the pool's scores (a numpy array)
    truth: object  # the pool's ground truth (a numpy array of bools)
    inputs: dict | None


def load_run(run_dir: Path, metrics: dict) -> Run:
    """A finished run, from its metrics.json (``metrics``, read) and scores.csv. Checks that scores.csv's cosine gives
    metrics.json's AP (the same convention: a low score is a suspect)."""
    import csv

    import numpy as np

    from pmp_lightning.policy import average_precision

    pmp, _ = score_families()
    with open(run_dir / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    truth = np.array([int(r["is_mislabeled"]) for r in rows], dtype=bool)
    pool = {name: np.array([float(r[name]) for r in rows]) for name in rows[0] if name in pmp}
    ap = {name: row["ap"] for name, row in metrics["detection"].items()}
    if "cosine" in pool and abs(float(average_precision(truth, -pool["cosine"])[0]) - ap["cosine"]) > 1e-6:
        raise ValueError(f"{run_dir}: scores.csv's cosine does not give metrics.json's AP")
    record = metrics.get("canaries") or {}
    inputs = record.get("inputs")
    if inputs:
        inputs = {"is_canary": np.array(inputs["is_canary"], dtype=bool),
                  "scores": {name: np.array(v) for name, v in inputs["scores"].items()}}
    return Run(ap, pool, truth, inputs)


def rule_ap(run: Run, rule, fallback: str, class_replays: bool = True) -> float:
    """The pool AP of the score ``auto`` that ``rule`` gives on this run (``class_replays=False``: as if the run had
    computed no class variant)."""
    from pmp_lightning.policy import average_precision, candidates, combine, decide
    from pmp_lightning.scores.registry import CLASS_VARIANTS

    have = {name for name in run.pool if class_replays or name not in CLASS_VARIANTS}
    if run.inputs is None:
        combined = candidates(rule, have, fallback)[:1]
    else:
        scores = {name: s for name, s in run.inputs["scores"].items() if name in have}
        combined = decide(rule, scores, run.inputs["is_canary"], candidates(rule, scores, fallback))["combined"]
    if len(combined) == 1:
        return run.ap[combined[0]]
    return float(average_precision(run.truth, -combine([run.pool[name] for name in combined]))[0])


def fit(suite: dict, runs: Path, fallback: str | None = None,
        rules: list[str] | None = None) -> tuple[str, str, str, bool]:
    """Every rule of ``policy.RULES`` replayed on the suite's runs: the markdown report, the winning rule, the
    fallback and whether the class replays earn their cost (see the comment above ``CLASS_WORTH``). ``fallback``:
    the incumbent to replay the rules with (a suite that validates a fitted default keeps its fallback), instead of
    the one these runs would pick. ``rules``: the rules whose per-row AP and regret the report lists side by side (a
    comparison fixed before the suite ran), instead of the winner's alone."""
    from pmp_lightning.policy import RULES
    from pmp_lightning.scores.registry import PMP_VARIANTS

    unknown = sorted(set(rules or ()) - set(RULES))
    if unknown:
        raise ValueError(f"--rules {', '.join(unknown)}: no such rule; the rules: {', '.join(RULES)}")

    rows = []
    for row in suite["rows"]:
        done = finished(row, runs)
        loaded = [load_run(run_dir, metrics) for run_dir, metrics in done[0].items()]
        if loaded:
            rows.append((row, row_result(row, runs, done), loaded))
    if not rows:
        raise ValueError(f"no finished runs under {runs}")
    whole = [c for c in PMP_VARIANTS if all(c in run.ap for _, _, loaded in rows for run in loaded)]
    normalised = {c: _mean(_mean(run.ap[c] for run in loaded) / result.best_pmp_ap for _, result, loaded in rows)
                  for c in whole}
    given = fallback is not None
    if not given:
        fallback = max(whole, key=lambda c: normalised[c])
    elif fallback not in whole:
        raise ValueError(f"--fallback {fallback}: not a PMP column of every run ({', '.join(whole)})")
    table = {}
    for name, rule in RULES.items():
        for class_replays in (True, False):
            aps = [_mean(rule_ap(run, rule, fallback, class_replays) for run in loaded) for _, _, loaded in rows]
            regrets = [result.best_pmp_ap - ap for (_, result, _), ap in zip(rows, aps)]
            ratios = [ap / result.best_baseline_ap for (_, result, _), ap in zip(rows, aps) if result.best_baseline_ap]
            table[name, class_replays] = dict(aps=aps, regrets=regrets, mean=_mean(regrets), median=_median(regrets),
                                              max=max(regrets), share=_mean(r >= RATIO_TARGET for r in ratios))
    best = min(RULES, key=lambda n: (table[n, True]["mean"], table[n, True]["max"]))
    class_worth = table[best, False]["mean"] - table[best, True]["mean"] > CLASS_WORTH
    lines = [f"Fallback (no canaries): **{fallback}**{' (given)' if given else ''}; each whole-J PMP variant's mean of "
             f"AP / the row's best PMP "
             f"column's AP over {len(rows)} rows: " + ", ".join(f"{c} {v:.3f}" for c, v in
                                                                sorted(normalised.items(), key=lambda kv: -kv[1])), "",
             "| rule | variants | incumbent | decide | hedge | class replays | mean regret | median | max | "
             f"rows ≥ {RATIO_TARGET}× best baseline |", "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for (name, class_replays), t in table.items():
        rule = RULES[name]
        lines.append(f"| {'**' + name + '**' if name == best and class_replays else name} | {rule.variants} | "
                     f"{rule.incumbent} | {rule.decide} | {'yes' if rule.hedge else 'no'} | "
                     f"{'yes' if class_replays else 'no'} | {t['mean']:.4f} | {t['median']:.4f} | {t['max']:.4f} | "
                     f"{t['share']:.0%} |")
    lines += ["", f"Winner: **{best}** (lowest mean regret with the class replays); without them its mean regret is "
                  f"{table[best, False]['mean']:.4f} against {table[best, True]['mean']:.4f}, so the class replays "
                  + ("earn" if class_worth else "do not earn") + f" their cost (the bar: more than {CLASS_WORTH}).", ""]
    # per row: the named rules' AP and regret side by side, else the winner's, and its AP without the class replays
    columns = [column for name in rules or [best] for column in ((name, table[name, True]["aps"]),
                                                                   ("regret", table[name, True]["regrets"]))]
    if not rules:
        columns.append(("without class replays", table[best, False]["aps"]))
    lines += ["| row | seeds | best PMP column | AP | " + " | ".join(h for h, _ in columns) + " | best baseline | AP |",
              "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in columns) + " | --- | ---: |"]
    for k, (row, result, loaded) in enumerate(rows):
        lines.append(f"| {row['name']} | {len(loaded)} | {result.best_pmp} | {_f(result.best_pmp_ap)} | "
                     + " | ".join(_f(values[k]) for _, values in columns)
                     + f" | {result.best_baseline or '–'} | {_f(result.best_baseline_ap)} |")
    return "\n".join(lines) + "\n", best, fallback, class_worth


# ----------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pmp_lightning.report.suite", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("draw", help="draw a suite of settings into a YAML file")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("run", help="run every row x seed of a suite, skipping runs that finished")
    p.add_argument("suite", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", action="append", help="a row's name (repeat for several)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p = sub.add_parser("fit", help="replay every rule of policy.RULES on a suite's runs and name the best")
    p.add_argument("suite", type=Path)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fallback", help="replay with this incumbent (e.g. the fitted default's, on a validation suite)")
    p.add_argument("--rules", help="comma-separated rules whose per-row AP and regret to list side by side")
    p = sub.add_parser("table", help="the per-row table and summary of a suite's runs")
    p.add_argument("suite", type=Path)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from pmp_lightning.io import save_text

    if args.command == "draw":
        rows = draw(args.seed, args.rows)
        save_text(args.out, suite_yaml(args.seed, rows))
        print(f"{len(rows)} rows ({sum(r.cheap for r in rows)} cheap) written to {args.out}")
        return 0
    try:
        suite = load_suite(args.suite)
        if args.command == "run":
            return 1 if run_suite(suite, args.out, args.only, args.dry_run) else 0
        if args.command == "fit":
            text, *_ = fit(suite, args.runs, args.fallback, args.rules.split(",") if args.rules else None)
            save_text(args.out, f"# Rules fitted on {args.suite.stem}\n\n{text}")
            print(text, end="")
            return 0
    except ValueError as err:
        parser.exit(2, f"suite: {err}\n")
    text, _ = suite_table(suite, args.runs, args.suite.stem)
    save_text(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
