"""W&B offline: the run's own files hold the summary metrics and the logged plots."""
import json
import struct
import time

import pytest

from pmp_lightning.pipeline import run
from tests.test_pipeline import make_cfg

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

pytestmark = pytest.mark.slow  # every test here runs the pipeline or several processes

BLOCK = 32768


def read_records(path):
    """Records of a .wandb file: a LevelDB-style log (7-byte header ':W&B' magic version, 32 KiB blocks,
    7-byte record headers crc/length/type with FULL=1, FIRST=2, MIDDLE=3, LAST=4) of protobuf Records."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_offline_run_files_hold_the_summary_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where wandb would stage by default: ~/.local/share/wandb
    metrics = run(make_cfg(tmp_path, "logger=wandb", "scoring.scores=[raw,cosine,loss]"))
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # wandb's writer is a separate process that may still be flushing after wandb.finish() returns
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in read_records(files[0])):
        assert time.monotonic() < deadline, "the offline run never recorded its exit"
        time.sleep(0.5)
    summary, history, config = {}, {}, {}
    for record in read_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.update({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    for score in ("raw", "cosine", "loss"):
        for metric, value in metrics["detection"][score].items():
            assert summary[f"detection/{score}/{metric}"] == pytest.approx(value)
    assert summary["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert {"costate/lambda_norm", "costate/participation", "costate/contribution_auroc", "pr_curves_table/_type",
            "histogram/raw/mislabeled/values"} <= set(history)
    # each curve has its own step key, so the summary pairs ‖λ_T‖ with t = T (a shared "costate/t" ended at T − 1)
    norms = metrics["costate"]["lambda_norms"]
    assert summary["costate/lambda_t"] == len(norms) and summary["costate/lambda_norm"] == pytest.approx(norms[-1])
    assert summary["costate/snapshot_t"] == len(norms) - 1 and "costate/t" not in summary
    assert json.loads(history["top_suspects/_type"]) == "table-file"
    # 32 suspects per score: raw, cosine, loss, auto and block_fit (fitted on the canaries, where auto chooses)
    assert json.loads(history["top_suspects/nrows"]) == 5 * 32
    assert config["replay"]["curvature"] == "expm"  # the full config is logged
    # everything a sync needs is under the run directory: the table images were staged there, not in ~/.local/share
    assert any((tmp_path / "wandb" / "data" / "artifacts" / "staging").iterdir())
    assert not list((tmp_path / "home").glob("**/artifacts/staging/*"))
