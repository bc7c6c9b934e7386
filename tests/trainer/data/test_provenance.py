"""What a model was trained on travels with it (training_data.json), and ifas-predict / ifas-eval say when
that was synthetic shards only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shards.adapters import get_adapter
from shards.build import BuildOptions, build_dataset
from shards.fixtures import write_tree
from trainer.data.provenance import synthetic_only_note, training_data
from trainer.run_dir import TRAINING_DATA


@pytest.fixture(scope="module")
def real_set(tmp_path_factory) -> Path:
    """A shard set built from a dataset tree (an OULU-NPU fixture) by ifas-shards build."""
    root = tmp_path_factory.mktemp("oulu")
    write_tree("oulu_npu", root / "raw")
    build_dataset(get_adapter("oulu_npu", str(root / "raw")), root / "out", BuildOptions(frames=1, size=32,
                                                                                          face="center"))
    return root / "out" / "train"


def test_sources_come_from_the_manifests(small_shards, real_set) -> None:
    synth = training_data([str(small_shards["domain_a"]), str(small_shards["domain_b"])])
    assert synth["synthetic_only"] is True
    assert [(s["name"], s["source"], s["num_samples"]) for s in synth["sets"]] == [
        ("domain_a", "synthetic", 48), ("domain_b", "synthetic", 48)]
    assert synth["sets"][0]["datasets"] == {"domain_a": 48}
    mixed = training_data([str(small_shards["domain_a"]), str(real_set)])
    assert mixed["synthetic_only"] is False
    assert mixed["sets"][1]["source"] == "dataset" and mixed["sets"][1]["datasets"] == {"OULU-NPU": 2}


def _model_trained_on(tiny_model_dir: Path, tmp_path: Path, sets: list[str] | None) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if sets is not None:
        (model / TRAINING_DATA).write_text(json.dumps(training_data(sets)))
    return model


def test_predict_and_eval_say_when_the_model_saw_only_synthetic_faces(tiny_model_dir, small_shards, real_set,
                                                                      tmp_path, capsys) -> None:
    from trainer.cli.eval import main as eval_main
    from trainer.cli.predict import main as predict_main

    synthetic = _model_trained_on(tiny_model_dir, tmp_path / "s", [str(small_shards["domain_a"])])
    assert "never seen a real face" in synthetic_only_note(synthetic)
    shard = str(small_shards["domain_d"] / "shard-000000.tar")
    assert predict_main(["--model", str(synthetic), "--no-explain", "--jsonl", shard]) == 0
    out = capsys.readouterr()
    assert "ifas-predict: warning: this model was trained only on synthetic shards (domain_a)" in out.err
    records = [json.loads(ln) for ln in out.out.splitlines()]
    assert len(records) == 16 and all(r["model_training_data"] == "synthetic_only" for r in records)

    assert eval_main(["--model", str(synthetic), "--out", str(tmp_path / "eval"), "--explain-samples", "0",
                      "--batch-size", "16", shard]) == 0
    assert "ifas-eval: warning: this model was trained only on synthetic shards" in capsys.readouterr().err
    assert (tmp_path / "eval" / "eval_metrics.md").read_text().startswith("Note: this model was trained only on "
                                                                          "synthetic shards (domain_a)")

    for sets in ([str(small_shards["domain_a"]), str(real_set)], None):  # real data seen, or nothing recorded
        model = _model_trained_on(tiny_model_dir, tmp_path / f"r{sets is None}", sets)
        assert synthetic_only_note(model) is None
        assert predict_main(["--model", str(model), "--no-explain", "--jsonl", shard]) == 0
        out = capsys.readouterr()
        assert "warning" not in out.err and "model_training_data" not in out.out
