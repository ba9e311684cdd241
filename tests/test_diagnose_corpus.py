"""``python -m pmp_lightning.report.diagnose`` on a language-model run: the rebuilt model gets the tokenizer's
vocabulary, as the run's did."""
import re
import subprocess
import sys

import pytest

from tests.test_language_model import TINY_LM
from tests.test_pipeline import ROOT


@pytest.mark.slow
def test_diagnose_runs_on_a_code_lm_run(tmp_path, capsys):
    """It failed with `TypeError: empty(): argument 'size' … NoneType` in nn.Embedding: the model was rebuilt without
    the corpus's vocabulary (model.vocab_size is null in model=gpt). Now it prints the layer table of the language
    model, for the plain and the centred J, measured against the corrupted documents, and the per-block picture."""
    from pmp_lightning.report.diagnose import diagnose, main

    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "run.py", *TINY_LM, "scoring.scores=[cosine,loss]", f"hydra.run.dir={run_dir}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    main([str(run_dir)])
    shown = capsys.readouterr().out
    assert re.search(r"^J = ce at θ_\d+: mean logit pull ‖w̄‖ = [\d.e+-]+, left in$", shown, re.M)
    assert re.search(r"^J = ce, centred at θ_\d+: mean logit pull ‖w̄‖ = [\d.e+-]+, removed$", shown, re.M)
    for layer in ("tokens (Embedding)", "positions (Embedding)", "blocks.0.attn (MultiheadAttention)", "head (Linear)"):
        assert shown.count(f"  {layer} ") == 2, layer  # a row in each J's table, its name in full
    assert shown.count("whole vector: AUROC ") == 2 and "per block, over every snapshot the replay kept:" in shown
    assert (run_dir / "diagnose.png").stat().st_size > 1000
    report = diagnose(run_dir)
    rows = report["ce"]["layers"]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0) and all(0.0 <= r["auroc"] <= 1.0 for r in rows)
    assert rows[0]["layer"] == "tokens (Embedding)" and rows[0]["grad_J_norm"] > 0
