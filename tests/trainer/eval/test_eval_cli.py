"""The evaluation command, periodic evaluation and system scalars, read back with TensorBoard's
own event reader. The model is a tiny random one (its scores are meaningless; the plumbing is not)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, launch_env, tensorboard_events
from trainer.dist import free_port


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, small_shards, tmp_path_factory):
    from trainer.cli.eval import main

    out = tmp_path_factory.mktemp("eval")
    d = {k: str(v) for k, v in small_shards.items()}
    code = main(["--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "16",
                 "--dev-shards", d["domain_a"], d["domain_b"], "--dev-split", "", "--explain-samples", "4",
                 "--max-new-tokens", "6", f"M={d['domain_d']}", d["domain_c"]])
    assert code == 0
    return out


def test_eval_writes_metrics_tables_plots_and_explanations(eval_run):
    out = eval_run
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert set(metrics) == {"M", "domain_c"}
    m = metrics["M"]
    assert m["num_live"] + m["num_spoof"] == 48 and m["dataset"] == "domain_d"
    assert m["video"]["num_live"] + m["video"]["num_spoof"] == 24  # 2 frames per video
    assert set(m["per_attack"]) == {"print", "replay", "mask"}
    calibration = json.loads((out / "calibration.json").read_text())
    assert m["fixed_threshold"] == pytest.approx(calibration["threshold"]) and calibration["samples"] == 96
    assert m["hter_fixed"] is not None and m["tpr_at_fpr1"] is not None
    md = (out / "eval_metrics.md").read_text()
    assert "| M | video |" in md and "| domain_c | replay |" in md and "names true attack cue" in md
    tables = (out / "eval_tables.md").read_text()  # "M" maps to the OCIM column OCI->M
    assert "| ours (avg over 1 of 4) |" in tables and "| I-FAS (paper) | 0.32/99.88 |" in tables
    assert {p.name for p in (out / "plots").iterdir()} == {"roc.png", "hist_M.png", "hist_domain_c.png"}
    assert (out / "plots" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    explained = json.loads((out / "eval_explanations.json").read_text())
    for name in ("M", "domain_c"):
        e = explained[name]
        assert set(e["metrics"]) == {"greedy", "sampled"} and e["metrics"]["greedy"]["samples"] == 4
        assert len(e["examples"]) == 8 and {x["judgment"] for x in e["examples"]} <= {"Yes", "No"}
        # each example follows the judgment its score gets at the threshold in use
        for x in e["examples"]:
            assert x["judgment"] == ("Yes" if x["score"] >= e["threshold"] else "No")


def test_tensorboard_reader_finds_scalars_images_and_text(eval_run):
    acc = tensorboard_events(eval_run / "tb")
    tags = acc.Tags()
    for tag in ("eval/M/hter", "eval/M/auc", "eval/M/hter_fixed", "eval/M/video/auc", "eval/domain_c/acer",
                "explain/M/greedy/contradiction_rate"):
        assert tag in tags["scalars"], tag
    assert {"eval_plots/roc", "eval_plots/M/histogram", "explain/M/00"} <= set(tags["images"])
    roc = acc.Images("eval_plots/roc")[0]
    assert roc.width > 100 and roc.height > 100
    text_tags = [t for t in tags["tensors"] if t.startswith("explain/M/00")]
    assert text_tags
    text = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert "Is this photo of a real person?" in text and "**A (greedy):**" in text
    hter = json.loads((eval_run / "eval_metrics.json").read_text())["M"]["hter"]
    assert acc.Scalars("eval/M/hter")[0].value == pytest.approx(hter, rel=1e-6)


def test_merge_renders_protocol_tables(tmp_path):
    from trainer.cli.eval import main

    for name, hter in (("M", 0.1), ("C", 0.2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_metrics.json").write_text(json.dumps({name: {"hter": hter, "auc": 0.9}}))
    out = tmp_path / "tables"
    assert main(["--merge", str(tmp_path / "M" / "eval_metrics.json"), str(tmp_path / "C" / "eval_metrics.json"),
                 "--out", str(out)]) == 0
    md = (out / "eval_tables.md").read_text()
    assert "| ours (avg over 2 of 4) | 10.00/90.00 | 20.00/90.00 | - | - | 15.00/90.00 |" in md
    assert json.loads((out / "eval_tables.json").read_text())["ocim"]["test_sets"] == {"M": "M", "C": "C"}


def test_threshold_from_file(tmp_path):
    from trainer.eval.scoring import threshold_from_file

    (tmp_path / "cal.json").write_text(json.dumps({"threshold": 0.42, "source": "dev"}))
    assert threshold_from_file(tmp_path / "cal.json")[0] == 0.42
    (tmp_path / "fixed.json").write_text(json.dumps({"a": {"fixed_threshold": 0.3, "eer_threshold": 0.5},
                                                     "b": {"fixed_threshold": 0.3, "eer_threshold": 0.6}}))
    assert threshold_from_file(tmp_path / "fixed.json")[0] == 0.3
    (tmp_path / "one.json").write_text(json.dumps({"a": {"fixed_threshold": None, "eer_threshold": 0.55}}))
    assert threshold_from_file(tmp_path / "one.json")[0] == 0.55
    (tmp_path / "two.json").write_text(json.dumps({"a": {"eer_threshold": 0.5}, "b": {"eer_threshold": 0.6}}))
    with pytest.raises(ValueError, match="--dev-shards"):
        threshold_from_file(tmp_path / "two.json")
    with pytest.raises(FileNotFoundError, match="--threshold-from"):
        threshold_from_file(tmp_path / "missing.json")


def test_eval_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    from trainer.cli.eval import main

    assert main(["--model", str(tmp_path), str(tmp_path)]) == 2
    assert "neither an exported model" in capsys.readouterr().err
    assert main(["--model", str(tiny_model_dir), "--out", str(tmp_path), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ifas-eval: error:") and "does not exist" in err[0]


class FakeEngine:
    """What PeriodicEvaluator needs of a DeepSpeed engine: eval(), train(), forward."""

    def __init__(self, model):
        self.model, self.mode_calls = model, []

    def eval(self):
        self.mode_calls.append("eval")

    def train(self):
        self.mode_calls.append("train")

    def __call__(self, **kw):
        return self.model(**kw)


def test_periodic_evaluator_logs_and_tracks_best(tiny_model_dir, small_shards, tmp_path):
    from trainer.config import load_config
    from trainer.data import ImageTransform, resolve_shards
    from trainer.dist import WorldInfo
    from trainer.eval.periodic import PeriodicEvaluator
    from trainer.eval.scoring import PROMPT_ONLY_MAX_LENGTH
    from trainer.logs import MetricsWriter
    from trainer.model.ifas import IFASModel
    from trainer.sample.prompt import PromptBuilder

    model, tok = IFASModel.from_pretrained(tiny_model_dir)
    model.eval()
    cfg = load_config(None, ["eval.every=2", f"eval.dev_shards=[{small_shards['domain_a']}]", "eval.dev_split=''",
                             "eval.batch_size=24"])
    writer = MetricsWriter(tmp_path / "tb")
    builder = PromptBuilder(tok, model.num_image_tokens, PROMPT_ONLY_MAX_LENGTH)
    transform = ImageTransform.for_model(model.arch)
    evaluator = PeriodicEvaluator(cfg, resolve_shards([str(small_shards["domain_d"])]), builder, transform,
                                  WorldInfo(0, 0, 1), tok.pad_token_id, writer, tmp_path)
    engine = FakeEngine(model)
    ran = {}
    for step in range(1, 5):
        if step == 3:  # change the model so the second evaluation differs
            with torch.no_grad():
                model.llm.get_output_embeddings().weight[model.arch.yes_token_id].mul_(-3.0)
        result = evaluator.maybe_run(engine, step)
        if result is not None:
            ran[step] = result["held-out"]
    assert sorted(ran) == [2, 4] and engine.mode_calls == ["eval", "train"] * 2
    best = json.loads((tmp_path / "best.json").read_text())
    # a dev set fixes the threshold: the best step is the one with the lowest held-out HTER at it, never the
    # HTER at the test set's own EER threshold (chosen by looking at the test labels)
    best_step = min(ran, key=lambda s: (ran[s].hter_fixed, s))
    assert best["criterion"] == "hter_fixed" and "dev samples fix" in best["chosen_by"]
    assert best["step"] == best_step and best["value"] == pytest.approx(ran[best_step].hter_fixed)
    assert best["tag"] == f"step_{best_step:08d}" and evaluator.last_was_best == (best_step == 4)
    history = [json.loads(ln) for ln in (tmp_path / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history][:2] == [2, 4] and history[0]["threshold_fixed"] is not None
    resumed = PeriodicEvaluator(cfg, resolve_shards([str(small_shards["domain_d"])]), builder, transform,
                                WorldInfo(0, 0, 1), tok.pad_token_id, None, tmp_path)
    again = resumed.run(engine, 4)["held-out"]  # same model as step 4: not better than the restored best
    assert resumed.best["step"] == best_step and resumed.last_was_best == (again.hter_fixed < best["value"])
    evaluator.run(engine, 5, final=True)  # end of training: the full report
    assert (tmp_path / "eval_metrics.json").is_file() and (tmp_path / "plots" / "roc.png").is_file()
    writer.close()
    acc = tensorboard_events(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("eval/held-out/hter")] == [2, 4, 5]
    assert [e.step for e in acc.Scalars("eval/best/hter_fixed")] == [2, 4, 5]
    assert "eval/held-out/video/hter" in acc.Tags()["scalars"] and "eval_plots/roc" in acc.Tags()["images"]


def test_without_a_dev_set_the_best_step_is_the_one_with_the_highest_auc(tiny_model_dir, small_shards, tmp_path):
    from trainer.config import load_config
    from trainer.data import ImageTransform, resolve_shards
    from trainer.dist import WorldInfo
    from trainer.eval.periodic import PeriodicEvaluator
    from trainer.eval.scoring import PROMPT_ONLY_MAX_LENGTH
    from trainer.model.ifas import IFASModel
    from trainer.sample.prompt import PromptBuilder

    model, tok = IFASModel.from_pretrained(tiny_model_dir)
    model.eval()
    cfg = load_config(None, ["eval.every=1", "eval.dev_shards=[]", "eval.batch_size=24"])
    evaluator = PeriodicEvaluator(cfg, resolve_shards([str(small_shards["domain_d"])]),
                                  PromptBuilder(tok, model.num_image_tokens, PROMPT_ONLY_MAX_LENGTH),
                                  ImageTransform.for_model(model.arch),
                                  WorldInfo(0, 0, 1), tok.pad_token_id, None, tmp_path)
    ran = {}
    for step in (1, 2):
        if step == 2:  # the judgment flipped: the AUC goes to 1 - AUC
            with torch.no_grad():
                head = model.llm.get_output_embeddings().weight
                head[[model.arch.yes_token_id, model.arch.no_token_id]] = head[[model.arch.no_token_id,
                                                                                model.arch.yes_token_id]]
        ran[step] = evaluator.run(FakeEngine(model), step)["held-out"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert ran[1].auc != ran[2].auc and ran[1].hter_fixed is None
    assert best["criterion"] == "auc" and best["step"] == max(ran, key=lambda s: ran[s].auc)
    assert best["value"] == pytest.approx(max(r.auc for r in ran.values()))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rank_eval_equals_one_rank(tiny_model_dir, small_shards, eval_run, tmp_path):
    """torchrun with 2 CPU ranks: each scores half, rank 0 gathers; same metrics as one process."""
    out = tmp_path / "eval2"
    d = {k: str(v) for k, v in small_shards.items()}
    env = launch_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "trainer.cli.eval", "--model", str(tiny_model_dir), "--out", str(out), "--batch-size", "16",
         "--dev-shards", d["domain_a"], d["domain_b"], "--dev-split", "", "--explain-samples", "4",
         "--max-new-tokens", "6", f"M={d['domain_d']}", d["domain_c"]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((eval_run / "eval_metrics.json").read_text())
    two = json.loads((out / "eval_metrics.json").read_text())
    for name in one:
        for key in ("num_live", "num_spoof", "hter", "auc", "eer", "hter_fixed", "fixed_threshold"):
            assert two[name][key] == pytest.approx(one[name][key], abs=1e-5), (name, key)
        assert two[name]["video"]["auc"] == pytest.approx(one[name]["video"]["auc"], abs=1e-5)
    scores_one = json.loads((eval_run / "eval_scores.json").read_text())
    scores_two = json.loads((out / "eval_scores.json").read_text())
    assert scores_one.keys() == scores_two.keys() and scores_one["M"].keys() == scores_two["M"].keys()
    explained = json.loads((out / "eval_explanations.json").read_text())
    assert explained["M"]["metrics"]["greedy"]["samples"] == 4  # 2 per rank
