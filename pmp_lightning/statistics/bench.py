"""Benchmark of the replay's per-example statistics against the alternatives, in one process.

    python -m pmp_lightning.statistics.bench [--model cnn] [--examples 256] [--chunk N] [--repeats 15] [--threads 1] [--device cpu] [--load 1]

Methods, all on the same examples, parameters and direction λ:
  (a) loop      the reported approach: one ``torch.autograd.grad`` per example, then dots and norms
  (b) vmap_grad ``torch.func.vmap(grad)``: every per-example gradient materialised, then dots and norms
  (c) vmap_jvp  ``vmap`` over examples of one ``jvp`` of the loss along λ: dots only, no norms
  (d) stats     the project's pass (``pmp_lightning.statistics.per_example.per_example_stats``): dots, norms, loss,
                margin, correctness, EL2N from one forward and one backward
  (d') stats_blocks  the same with every part's share kept and summed into the network's blocks (what the replay
                runs since it keeps per-block statistics): stats_blocks/stats is their cost
  (e) train     one training step's forward and backward over the same examples (the physical limit)

Timing that survives a busy machine: after a warm-up, the methods run in interleaved rounds (one of each
per round, ``--repeats`` rounds: ABCDE ABCDE …, never AAAA BBBB …), so a burst of outside load hits every
method alike, and each method's minimum over the rounds is its time with the least interference. Ratios
are taken from the minima; medians are printed beside them. ``--load N`` runs N extra processes doing
matrix products for the whole measurement, to check that the ratios hold on a loaded machine.

On a CPU every method runs on one thread by default (``--threads 1``; 0 = torch's default, every core).
A ratio taken on all cores also measures how well each method spreads over threads and how many cores
an outside process takes: on 2 cores one busy process moved vmap_grad/stats from 7.6 to 5.1 and
loop/stats from 3.4 to 5.4 at two threads (9 rounds), while at one thread and 15 rounds the three
ratios moved by 4%, 1% and 9%. This machine's own speed drifts by ±10% over minutes, hence 15 rounds.

Peak memory (CPU: the process's peak resident set; GPU: the allocator's peak) is reported for (d)
against (e), each in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from pmp_lightning.statistics.per_example import default_chunk, per_example_stats
from pmp_lightning.statistics.plan import block_matrix, plan_for
from pmp_lightning.data.corpus import VOCAB_SIZE
from pmp_lightning.task import training_loss
from pmp_lightning.training import shaped

MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "conf" / "model"
# the shipped models (conf/model/*.yaml, as configured there), and the benchmark's own sizes: a shipped config with
# settings changed (the ResNet and ViT at a million parameters, 1.09M and 1.02M, the ViT with 7×7 patches, the stem
# shipped until 2026-12-03; the language model at GPT-2 small's shape, untied: 163M parameters, 124M if its head shared
# the token table) or its attention swapped for a hand-written module (in the patch ViT)
SHIPPED = sorted(p.stem for p in MODEL_CONFIGS.glob("*.yaml"))
RESIZED = {"resnet_1m": ("resnet", {"width": 40, "blocks": [2, 2, 2]}),
           "vit_1m": ("vit", {"dim": 144, "depth": 6, "mlp_dim": 288, "stem": "patch", "pool": "cls"}),
           "vit_fallback": ("vit", {"stem": "patch", "pool": "cls"}),
           "gpt2_shape": ("gpt", {"vocab_size": 50257, "max_len": 1024, "dim": 768, "depth": 12, "heads": 12})}
MODELS = [*SHIPPED, *RESIZED]
# the language models' documents: random token ids, this many tokens (the default's data.length; 256 for GPT-2's shape)
SEQUENCE = {"gpt": 128, "gpt2_shape": 256}


def build(model: str) -> torch.nn.Module:
    """The benchmark's network ``model``, from its config in conf/model, shaped for MNIST's 28 × 28 images (a language
    model takes token ids, of the byte tokenizer's vocabulary unless the size sets its own)."""
    name, changes = RESIZED.get(model, (model, {}))
    cfg = OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml")
    cfg.pop("defaults", None)  # the recipe: training only
    cfg.merge_with(changes)
    net = shaped(instantiate(cfg, _partial_=True), torch.zeros(2, 1, 28, 28), 10, VOCAB_SIZE)()
    return _attention_through_the_fallback(net) if model == "vit_fallback" else net


class _HandWrittenAttention(torch.nn.Module):
    """Self-attention written by hand, its weights used through F.linear: no rule covers it, so the fallback does."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.proj = torch.nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, q, k, v, need_weights=False):
        b, t, d = q.shape
        qkv = F.linear(q, self.qkv).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, t, d)
        return F.linear(out, self.proj), None


def _attention_through_the_fallback(net: torch.nn.Module) -> torch.nn.Module:
    """The ViT with hand-written attention in every block: what the fallback (vmap(grad) per module) costs."""
    for block in net.blocks:
        block.attn = _HandWrittenAttention(block.attn.embed_dim, block.attn.num_heads)
    return net


METHODS = ("loop", "vmap_grad", "vmap_jvp", "stats", "stats_blocks", "train")


def _setup(model: str, examples: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    net = build(model).to(device).eval()
    if model in SEQUENCE:  # documents of random tokens, each with its next-token targets
        vocab = net.head.out_features
        x = torch.randint(0, vocab, (examples, SEQUENCE[model]), device=device)
        y = torch.randint(0, vocab, (examples, SEQUENCE[model]), device=device)
    else:
        x = torch.rand(examples, 1, 28, 28, device=device)
        y = torch.randint(0, 10, (examples,), device=device)
    params = {k: p.detach() for k, p in net.named_parameters()}
    lam = {k: torch.randn_like(p) for k, p in params.items()}
    return net, x, y, params, lam


def make_methods(net, x, y, params, lam, chunk: int):
    """name -> zero-argument function computing that method's outputs for all examples."""

    def single_loss(p, xi, yi):
        return training_loss(functional_call(net, p, (xi[None],)), yi[None])

    def loop():
        plist = list(net.parameters())
        dots, norms = [], []
        for xi, yi in zip(x, y):
            g = torch.autograd.grad(training_loss(net(xi[None]), yi[None]), plist)
            dots.append(sum((gi * lam[k]).sum() for gi, k in zip(g, params)))
            norms.append(torch.sqrt(sum(gi.pow(2).sum() for gi in g)))
        return torch.stack(dots), torch.stack(norms)

    @sdpa_kernel(SDPBackend.MATH)  # attention with batching rules (the fused CPU kernel runs example by example)
    def vmap_grad():
        dots, norms = [], []
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            g = vmap(grad(single_loss), in_dims=(None, 0, 0))(params, xs, ys)
            dots.append(sum((g[k] * lam[k]).flatten(1).sum(1) for k in g))
            norms.append(sum(g[k].pow(2).flatten(1).sum(1) for k in g).sqrt())
        return torch.cat(dots), torch.cat(norms)

    @sdpa_kernel(SDPBackend.MATH)  # the attention kernel with forward-mode derivatives
    def vmap_jvp():
        def dot(xi, yi):
            return jvp(lambda p: single_loss(p, xi, yi), (params,), (lam,))[1]

        return torch.cat([vmap(dot)(xs, ys) for xs, ys in zip(x.split(chunk), y.split(chunk))])

    def stats():
        out = [per_example_stats(net, xs, ys, lam) for xs, ys in zip(x.split(chunk), y.split(chunk))]
        return torch.cat([o["dot"] for o in out]), torch.cat([o["grad_norm"] for o in out])

    blocks = block_matrix(plan_for(net, x[:8], y[:8]), net)[1].to(x.device, x.dtype if x.is_floating_point() else torch.float32)

    def stats_blocks():  # what the replay runs: the pass with its parts kept, summed into the network's blocks
        out = []
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            o = per_example_stats(net, xs, ys, lam, by_layer=True)
            o["block_dot"], o["block_sq"] = o.pop("layer_dot") @ blocks, o.pop("layer_sq") @ blocks
            out.append(o)
        return torch.cat([o["dot"] for o in out]), torch.cat([o["grad_norm"] for o in out])

    def train():
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            net.zero_grad(set_to_none=True)
            training_loss(net(xs), ys).backward()

    return {"loop": loop, "vmap_grad": vmap_grad, "vmap_jvp": vmap_jvp, "stats": stats, "stats_blocks": stats_blocks,
            "train": train}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device: str, repeats: int) -> dict[str, list[float]]:
    """Every method once per round, ``repeats`` rounds after one warm-up call each: seconds per call, per method."""
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


_HOG = "import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\nwhile True: a = torch.tanh(a @ a)"


@contextmanager
def cpu_load(processes: int):
    """``processes`` extra processes doing matrix products while the block runs (the busy-machine check)."""
    hogs = [subprocess.Popen([sys.executable, "-c", _HOG]) for _ in range(processes)]
    try:
        if hogs:
            time.sleep(2.0)  # let them start computing
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def peak_memory_mib(method: str, model: str, args) -> tuple[float, float] | None:
    """Peak memory while running ``method`` once, in a fresh process so methods do not share a high-water mark."""
    code = (
        "import json; from pmp_lightning.statistics import bench; from pmp_lightning.memory import PeakMemory; "
        f"a = json.loads({json.dumps(json.dumps(vars(args)))}); "
        f"fns = bench.make_methods(*bench._setup({model!r}, a['examples'], a['device']), a['chunk']); "
        f"fns[{method!r}](); "  # warm-up: allocator caches and lazy initialisation are not the method's
        "m = PeakMemory(a['device']); m.__enter__(); "
        f"fns[{method!r}](); "
        "m.__exit__(); print(json.dumps([m.peak_mib, m.base_mib]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, base = json.loads(out.stdout.strip().splitlines()[-1])
    return None if peak is None else (peak, peak - base)


# (in, out, input size, stride, kernel, padding) of the conv layers in the shipped models: the reported CNN, the
# small CNN, the ResNet at widths 16 and 40
CONV_LAYERS = [(1, 32, 28, 1, 3, 0), (32, 64, 26, 1, 3, 0), (1, 16, 28, 2, 5, 0), (16, 32, 12, 2, 3, 0),
               (1, 16, 28, 1, 3, 1), (16, 16, 28, 1, 3, 1), (16, 32, 28, 2, 3, 1), (16, 32, 28, 2, 1, 0),
               (32, 32, 14, 1, 3, 1), (32, 64, 14, 2, 3, 1), (32, 64, 14, 2, 1, 0), (64, 64, 7, 1, 3, 1),
               (1, 40, 28, 1, 3, 1), (40, 40, 28, 1, 3, 1), (40, 80, 28, 2, 3, 1), (80, 80, 14, 1, 3, 1),
               (80, 160, 14, 2, 3, 1), (160, 160, 7, 1, 3, 1)]


def conv_layer_costs(examples: int, repeats: int) -> list[dict]:
    """The conv weight rule's two ways (the kernel-offset loop, the grouped convolution backward) on each shipped conv
    layer, interleaved, each one's minimum over the rounds: what ``layer_rules.GROUPED_CHANNELS`` was set from."""
    from pmp_lightning.statistics import layer_rules

    rows = []
    for cin, cout, size, stride, k, pad in CONV_LAYERS:
        conv = torch.nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        x = torch.randn(examples, cin, size, size)
        delta, a = torch.randn_like(conv(x)), layer_rules.padded(conv, x)
        vw = torch.randn_like(conv.weight)
        fns = {"offsets": lambda: layer_rules.conv_weight_offsets(conv, a, delta, vw),
               "grouped": lambda: layer_rules.accumulate(None, None, layer_rules.per_example_weight_gradients(conv, a, delta), vw)}
        times = {name: min(t) for name, t in time_interleaved(fns, "cpu", repeats).items()}
        rows.append({"layer": f"{cin} -> {cout}, {size}x{size}, stride {stride}, kernel {k}", "positions": delta[0, 0].numel(),
                     **{f"{n}_ms": t * 1e3 for n, t in times.items()}, "grouped/offsets": times["grouped"] / times["offsets"],
                     "rule": "grouped" if layer_rules.grouped_is_cheaper(conv) else "offsets"})
        r = rows[-1]
        print(f"  {r['layer']:<38} positions {r['positions']:4d}: offsets {r['offsets_ms']:7.2f} ms, grouped "
              f"{r['grouped_ms']:7.2f} ms, ratio {r['grouped/offsets']:.2f}; the rule takes {r['rule']}", flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pmp_lightning.statistics.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["cnn"], choices=[*sorted(MODELS), "all"],
                        help="the networks to time, one after the other (default: the reported CNN; all: every one)")
    parser.add_argument("--examples", type=int, default=256, help="examples every method processes (default 256)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="examples per batch for the batched methods (default: the replay's, 64 on CPU and 1024 on GPU)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (each method once per round)")
    parser.add_argument("--load", type=int, default=0, help="extra processes doing matrix products during the timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per method (default 1: ratios that hold on a busy machine; 0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is a GPU)")
    parser.add_argument("--skip", nargs="*", default=[], choices=METHODS, help="methods to leave out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--conv-layers", action="store_true",
                        help="instead of whole models: the conv weight rule's two ways on each shipped conv layer")
    args = parser.parse_args(argv)
    args.chunk = args.chunk or default_chunk(args.device.split(":")[0])
    if args.threads < 0:
        parser.error(f"--threads {args.threads}: give a number of threads ≥ 1, or 0 for torch's default")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(MODELS) if "all" in args.model else args.model
    try:
        if args.conv_layers:
            return {"conv_layers": conv_layer_costs(args.examples if args.examples != 256 else 64, args.repeats)}
        results = {name: _run(args, name) for name in names}
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another program (the tests)
    if len(names) == 1:
        return results[names[0]]
    _summary(results)
    return results


def _summary(results: dict) -> None:
    """The targets' ratios for every model, in one table."""
    print(f"\n{'model':<10} {'parameters':>11} {'stats/train':>12} {'vmap_grad/stats':>16} {'memory stats/train':>19} "
          f"{'memory vmap_grad/stats':>23}")
    for name, r in results.items():
        mem = r.get("peak_memory_mib", {})

        def ratio(a, b):
            return f"{mem[a][0] / mem[b][0]:.2f}" if mem.get(a) and mem.get(b) else "-"

        vg = r["ratios"].get("vmap_grad/stats")
        print(f"{name:<10} {r['parameters']:>11,} {r['ratios']['stats/train']:>12.2f} {vg if vg is None else f'{vg:.2f}':>16} "
              f"{ratio('stats', 'train'):>19} {ratio('vmap_grad', 'stats'):>23}")


def _run(args, model: str) -> dict:
    net, x, y, params, lam = _setup(model, args.examples, args.device)
    fns = make_methods(net, x, y, params, lam, args.chunk)
    n_params = sum(p.numel() for p in params.values())
    print(f"model {model} ({n_params:,} parameters), {args.examples} examples, chunk {args.chunk}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} interleaved rounds" + (f", {args.load} CPU hog process(es) running" if args.load else ""))

    # every method computes the same numbers (in full float32: cuDNN's default TF32 convolutions would
    # give each method its own ~1e-3 rounding; the timings below use the defaults)
    skip = set(args.skip)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref_dot, ref_norm = fns["stats"]()
        for name in ("loop", "vmap_grad", "vmap_jvp", "stats_blocks"):
            if name in skip:
                continue
            try:
                got = fns[name]()
            except (NotImplementedError, RuntimeError) as err:  # e.g. no forward-mode derivative of fused attention
                print(f"  {name} cannot run on this model: {str(err).splitlines()[0][:120]}")
                skip.add(name)
                continue
            dot, norm = got if isinstance(got, tuple) else (got, None)
            assert torch.allclose(dot, ref_dot, rtol=1e-3, atol=1e-4 * ref_dot.abs().max()), name
            assert norm is None or torch.allclose(norm, ref_norm, rtol=1e-3), name

    with cpu_load(args.load):
        runs = time_interleaved({name: fns[name] for name in METHODS if name not in skip}, args.device, args.repeats)
    times = {name: min(t) for name, t in runs.items()}
    print(f"  {'method':<10} {'min':>10} {'median':>10}")
    for name, t in runs.items():
        print(f"  {name:<10} {min(t) * 1e3:7.1f} ms {statistics.median(t) * 1e3:7.1f} ms")

    ratios, median_ratios = {}, {}
    for num, den in (("stats", "train"), ("vmap_grad", "stats"), ("loop", "stats"), ("vmap_jvp", "stats"),
                     ("stats_blocks", "stats")):
        if num in times and den in times:
            ratios[f"{num}/{den}"] = times[num] / times[den]
            median_ratios[f"{num}/{den}"] = statistics.median(runs[num]) / statistics.median(runs[den])
    print("ratios of the minima:  " + "   ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    print("(of the medians:       " + "   ".join(f"{k} = {v:.2f}" for k, v in median_ratios.items()) + ")")
    result = {"times_s": times, "runs_s": runs, "ratios": ratios, "median_ratios": median_ratios, "parameters": n_params}
    if not args.no_memory:
        memory = {m: peak_memory_mib(m, model, args) for m in ("stats", "train", "vmap_grad") if m not in skip}
        if None not in memory.values():
            line = ", ".join(f"{m} {peak:.0f} MiB" for m, (peak, _) in memory.items())
            grown = ", ".join(f"{m} {growth:.0f} MiB" for m, (_, growth) in memory.items())
            print(f"peak memory, whole process: {line} (stats/train {memory['stats'][0] / memory['train'][0]:.2f}); "
                  f"growth during the call: {grown}")
        result["peak_memory_mib"] = memory
    return result


if __name__ == "__main__":
    main()
