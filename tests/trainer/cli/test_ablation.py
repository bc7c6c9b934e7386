"""The ablation grid: variants and their overrides, skipping what a protocol cannot compare, the
table in the paper's ablation layout, and the plain LM loss of the L-LM ablation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.cli.ablation import DEFAULT_GRID, RunOutcome, Variant, ablation_table, load_grid, main


@pytest.fixture
def protocol(small_shards, tmp_path):
    d = {k: str(v) for k, v in small_shards.items()}
    path = tmp_path / "proto.yaml"
    path.write_text(
        f"data:\n  train_shards: [{d['domain_a']}, {d['domain_b']}, {d['domain_c']}]\n"
        f"  eval_shards: [{d['domain_d']}]\n"
        "  num_workers: 0\nmodel:\n  projector_merge: 2\ntrain:\n  micro_batch_size: 4\n  log_every: 1\n"
        "  save_every: 100\neval:\n  batch_size: 16\noptim:\n  warmup_steps: 1\n"
    )
    return path


def test_default_grid_turns_off_each_part():
    variants = {v.name: v for v in load_grid(DEFAULT_GRID)}
    assert list(variants) == ["full", "no_gac", "plain_lm", "judgment_only", "template_captions", "no_augment",
                              "grpo"]
    assert variants["grpo"].after == "full" and "train.stage=grpo" in variants["grpo"].overrides
    assert variants["full"].overrides == () and variants["full"].gac and variants["full"].llm
    assert variants["no_gac"].overrides == ("model.gac=false",) and not variants["no_gac"].gac
    assert variants["plain_lm"].overrides == ("loss.mode=plain",) and not variants["plain_lm"].llm
    assert variants["judgment_only"].overrides == ("data.answer_style=judgment",)
    assert variants["template_captions"].requires_caption_source == "spoof_aware"
    assert variants["no_augment"].overrides == ("data.augment.enabled=false",)
    assert variants["no_augment"].requires_augment


def test_bad_grid_is_one_line(tmp_path, capsys, protocol):
    (tmp_path / "g.yaml").write_text("variants:\n  - name: x\n")
    assert main(["--protocol", str(protocol), "--grid", str(tmp_path / "g.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is malformed" in err[0]
    assert main(["--protocol", str(protocol), "--variants", "no_such", "--dry-run"]) == 2
    assert "--variants 'no_such'" in capsys.readouterr().err


def test_dry_run_prints_one_command_per_runnable_variant(protocol, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    assert main(["--protocol", str(protocol), "--steps", "3", "--out", str(tmp_path / "abl"), "--dry-run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 5  # template_captions cannot run: the synthetic shards hold template captions only
    for cmd, extra in zip(commands, ["", "model.gac=false", "loss.mode=plain", "data.answer_style=judgment"]):
        assert "--num_gpus" in cmd and "launch/train.sh --config" in cmd and "train.max_steps=3" in cmd
        assert cmd.endswith(extra)
    # the GRPO stage starts from the same seed's full run, with its own steps
    grpo = commands[4]
    assert f"model.init_from={tmp_path / 'abl' / 'full' / 'seed0'}" in grpo and "train.stage=grpo" in grpo
    assert grpo.index("train.max_steps=3") < grpo.index("train.max_steps=400")  # the later override wins
    assert "template_captions: skipped (not comparable here" in caplog.text
    assert "no_augment: skipped (not comparable here: the protocol trains without augmentation" in caplog.text


def test_no_augment_runs_where_the_protocol_augments(protocol, tmp_path, capsys):
    augmented = tmp_path / "aug.yaml"
    augmented.write_text(protocol.read_text().replace("data:\n", "data:\n  augment: {enabled: true}\n", 1))
    assert main(["--protocol", str(augmented), "--variants", "full", "no_augment", "--steps", "3", "--out",
                 str(tmp_path / "abl"), "--dry-run"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 and commands[1].endswith("data.augment.enabled=false")


def test_unknown_override_makes_a_variant_not_runnable(protocol, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    grid = tmp_path / "g.yaml"
    grid.write_text("variants:\n  - {name: odd, gac: true, llm: true, captions: shards, overrides: [data.nope=1]}\n")
    assert main(["--protocol", str(protocol), "--grid", str(grid), "--dry-run"]) == 0
    assert capsys.readouterr().out == "" and "not runnable: unknown config key 'data.nope'" in caplog.text


def test_table_layout_with_paper_figure_and_seed_spread():
    variants = load_grid(DEFAULT_GRID)
    outcomes = [
        RunOutcome("full", 0, "done", metrics={"held-out": {"hter": 0.10, "auc": 0.95}}),
        RunOutcome("full", 1, "reused", metrics={"held-out": {"hter": 0.20, "auc": 0.85}}),
        RunOutcome("no_gac", 0, "done", metrics={"held-out": {"hter": 0.30, "auc": 0.75}}),
        RunOutcome("plain_lm", 0, "failed", "exit 1; see log"),
        RunOutcome("judgment_only", 0, "done", metrics={"held-out": {"hter": 0.25, "auc": 0.80}}),
        RunOutcome("template_captions", 0, "skipped", "not comparable here: no SCF captions"),
    ]
    md, data = ablation_table(variants, outcomes, "template")
    lines = md.splitlines()
    assert lines[0] == (
        "| variant | GAC | L-LM | captions | held-out HTER % | held-out AUC % | "
        "paper HTER/AUC (One to Eleven avg) | note |"
    )
    assert lines[2] == "| full | ✓ | ✓ | template | 15.00 ± 7.07 | 90.00 ± 7.07 | 11.30/93.71 | 2 seed(s) |"
    assert lines[3] == "| no_gac | ✗ | ✓ | template | 30.00 | 75.00 | - | 1 seed(s) |"
    assert lines[4] == "| plain_lm | ✓ | ✗ | template | - | - | - | exit 1; see log |"
    assert lines[5] == "| judgment_only | ✓ | ✓ | judgment only | 25.00 | 80.00 | - | 1 seed(s) |"
    assert lines[6].startswith("| template_captions | ✓ | ✓ | template | - | - | - | not comparable here")
    assert data["rows"]["full"]["hter"]["held-out"] == pytest.approx([10.0, 20.0])
    json.dumps(data)


def test_table_averages_several_test_sets():
    variants = [Variant("full", True, True, "shards")]
    outcomes = [RunOutcome("full", 0, "done", metrics={"a": {"hter": 0.1, "auc": 0.9}, "b": {"hter": 0.3, "auc": 0.7}})]
    md, data = ablation_table(variants, outcomes, "SCF")
    assert "| full | ✓ | ✓ | SCF | 10.00 | 30.00 | 90.00 | 70.00 | 20.00 | 80.00 | 11.30/93.71 |" in md
    assert data["rows"]["full"]["avg_hter"] == pytest.approx([20.0])


def test_fixed_threshold_and_explanation_columns_where_runs_report_them(tmp_path):
    from trainer.cli.ablation import read_metrics
    from trainer.eval.report import report_explanations

    sft, grpo = tmp_path / "full" / "seed0", tmp_path / "grpo" / "seed0"
    for run_dir, hter_fixed in ((sft, 0.12), (grpo, 0.13)):
        run_dir.mkdir(parents=True)
        metrics = {"held-out": {"hter": 0.1, "auc": 0.9, "hter_fixed": hter_fixed}}
        (run_dir / "eval_metrics.json").write_text(json.dumps(metrics))
    greedy = {"samples": 240, "cue_hit_rate": 0.9, "wrong_cue_rate": 0.0, "live_cue_rate": 1.0,
              "contradiction_rate": 0.01, "mean_words": 12.0, "empty_rate": 0.0}
    report_explanations({"held-out": {"threshold": 0.5, "metrics": {"greedy": greedy}}}, grpo)  # the eval's writer

    variants = [Variant("full", True, True, "shards"), Variant("grpo", True, True, "shards", after="full")]
    outcomes = [RunOutcome("full", 0, "reused", metrics=read_metrics(sft)),
                RunOutcome("grpo", 0, "reused", metrics=read_metrics(grpo))]
    md, data = ablation_table(variants, outcomes, "template")
    lines = md.splitlines()
    assert lines[0] == (
        "| variant | GAC | L-LM | captions | held-out HTER % | held-out AUC % | held-out HTER@fixed % | "
        "held-out true-attack cue % | held-out contradictions % | paper HTER/AUC (One to Eleven avg) | note |"
    )
    assert lines[2] == "| full | ✓ | ✓ | template | 10.00 | 90.00 | 12.00 | - | - | 11.30/93.71 | 1 seed(s) |"
    assert lines[3] == "| grpo | ✓ | ✓ | template | 10.00 | 90.00 | 13.00 | 90.00 | 1.00 | - | 1 seed(s) |"
    assert data["rows"]["grpo"]["more"]["held-out true-attack cue %"] == pytest.approx([90.0])


def test_plain_loss_is_mean_ce_over_all_answer_tokens():
    from trainer.config import ConfigError, load_config
    from trainer.model.loss import lopsided_lm_loss, loss_alpha
    from trainer.sample import INTERPRETATION, JUDGMENT, UNSUPERVISED

    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    targets = torch.tensor([1, 2, 3, 4, 5, -100])
    groups = torch.tensor([JUDGMENT, INTERPRETATION, INTERPRETATION, JUDGMENT, INTERPRETATION, UNSUPERVISED])
    plain = lopsided_lm_loss(logits, targets, groups, alpha=None)
    assert plain.total.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    ce = F.cross_entropy(logits[:5], targets[:5], reduction="none")
    assert plain.judgment.item() == pytest.approx((ce[0] + ce[3]).item() / 5, rel=1e-6)
    # global counts: the same tokens among twice as many elsewhere halve it
    assert lopsided_lm_loss(logits, targets, groups, None, 4, 6).total.item() == pytest.approx(plain.total.item() / 2)
    # plain differs from L-LM (alpha 0.7 puts 70% on the 2 judgment tokens)
    assert not math.isclose(lopsided_lm_loss(logits, targets, groups, 0.7).total.item(), plain.total.item())
    assert loss_alpha("plain", 0.7) is None and loss_alpha("lopsided", 0.7) == 0.7
    assert load_config(None, ["loss.mode=plain"]).loss.mode == "plain"
    with pytest.raises(ConfigError, match="loss.mode must be lopsided or plain"):
        load_config(None, ["loss.mode=flat"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grid_runs_two_variants_and_reuses_them(protocol, tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["--protocol", str(protocol), "--steps", "2", "--out", str(out), "--variants", "full", "no_gac"]
    assert main(args) == 0
    md = (out / "ablation.md").read_text()
    for name in ("full", "no_gac"):
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} |"))
        hter = row.split("|")[5].strip()
        assert hter != "-" and 0.0 <= float(hter) <= 100.0, row
        assert (out / name / "seed0" / "eval_metrics.json").is_file()
    data = json.loads((out / "ablation.json").read_text())
    assert data["steps"] == 2 and data["rows"]["no_gac"]["gac"] is False
    capsys.readouterr()
    assert main(args) == 0  # a second call reuses the finished runs
    assert json.loads((out / "ablation.json").read_text())["rows"]["full"]["status"] == ["reused"]


def test_template_captions_variant_runs_on_shards_with_scf_captions(protocol):
    from collections import Counter

    from trainer.cli.ablation import skip_reason

    variant = {v.name: v for v in load_grid(DEFAULT_GRID)}["template_captions"]
    assert skip_reason(variant, Counter({"spoof_aware": 40, "general": 40}), protocol, []) == ""
    assert skip_reason(variant, Counter({"template": 80}), protocol, []).startswith("not comparable here")
