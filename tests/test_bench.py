"""The benchmark runs and its methods agree (it asserts that itself); no timing is checked here."""
from pmp_lightning import bench


def test_benchmark_runs_every_method_and_reports_ratios(capsys):
    result = bench.main(["--model", "small_cnn", "--examples", "16", "--chunk", "8", "--repeats", "1", "--device", "cpu"])
    assert set(result["times_s"]) == set(bench.METHODS)
    assert set(result["ratios"]) == {"stats/train", "vmap_grad/stats", "loop/stats", "vmap_jvp/stats"}
    assert "ratios:" in capsys.readouterr().out
    if "peak_memory_mib" in result:  # Linux: whole-process peak and growth for the pass and for training
        assert all(peak > 0 for peak, _ in result["peak_memory_mib"].values())
