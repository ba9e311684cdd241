"""The benchmark runs and its methods agree (it asserts that itself); no timing is checked here."""
import pytest

from pmp_lightning.statistics import bench


def test_benchmark_runs_every_method_and_reports_ratios(capsys):
    result = bench.main(["--model", "small_cnn", "--examples", "16", "--chunk", "8", "--repeats", "1", "--device", "cpu",
                         "--no-memory"])
    assert set(result["times_s"]) == set(bench.METHODS)
    assert set(result["ratios"]) == {"stats/train", "vmap_grad/stats", "loop/stats", "vmap_jvp/stats", "stats_blocks/stats"}
    assert all(len(t) == 1 for t in result["runs_s"].values())
    assert "ratios of the minima:" in capsys.readouterr().out


def test_benchmark_builds_the_shipped_models_from_their_configs_and_times_the_language_model():
    """The networks come from conf/model (every shipped config is a choice, none listed twice); the language model
    gets documents of token ids, and every method agrees with the pass on it (the benchmark asserts that)."""
    assert set(bench.SHIPPED) == {p.stem for p in bench.MODEL_CONFIGS.glob("*.yaml")} and "gpt" in bench.MODELS
    result = bench.main(["--model", "gpt", "--examples", "4", "--chunk", "2", "--repeats", "1", "--device", "cpu",
                         "--no-memory"])
    assert {"stats", "train", "vmap_grad"} <= set(result["times_s"])


@pytest.mark.slow
def test_benchmark_measures_peak_memory_in_fresh_processes():
    """Each method's whole-process peak and growth, where the kernel lets a process reset its high-water mark (Linux);
    None for every method elsewhere, never a mix."""
    from pmp_lightning.memory import PeakMemory

    result = bench.main(["--model", "small_cnn", "--examples", "16", "--chunk", "8", "--repeats", "1", "--device", "cpu"])
    memory = result["peak_memory_mib"]
    assert set(memory) == {"stats", "train", "vmap_grad"}
    with PeakMemory("cpu") as probe:
        pass
    if probe.source == "rss":
        assert all(peak > 0 and peak >= growth for peak, growth in memory.values()), memory
    else:
        assert all(value is None for value in memory.values()), memory


def test_rounds_interleave_the_methods():
    order = []
    runs = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, "cpu", 3)
    assert order == ["a", "b"] + ["a", "b"] * 3  # a warm-up call each, then ABAB…, never AAA BBB
    assert {k: len(v) for k, v in runs.items()} == {"a": 3, "b": 3}


def test_the_load_option_runs_hogs_and_stops_them():
    with bench.cpu_load(1) as hogs:
        assert len(hogs) == 1 and hogs[0].poll() is None  # computing
    assert hogs[0].poll() is not None  # stopped with the block


def test_threads_hold_for_the_timing_and_are_given_back(monkeypatch):
    import pytest
    import torch

    before, seen = torch.get_num_threads(), []
    monkeypatch.setattr(bench, "_run", lambda args, model: seen.append(torch.get_num_threads()) or {})
    bench.main(["--threads", "1", "--device", "cpu"])
    assert seen == [1] and torch.get_num_threads() == before  # the tests keep their threads
    with pytest.raises(SystemExit):
        bench.main(["--threads", "-2", "--device", "cpu"])
