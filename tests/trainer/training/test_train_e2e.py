"""The real stack end to end: 2 CPU ranks under DeepSpeed ZeRO-3 through launch/train.sh,
checkpoint + exact resume, consolidated export, evaluation scores, TensorBoard event files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import DEEPSPEED, ROOT, assert_export_scores_equal_the_runs, launch_env, tensorboard_events
from tests.helpers import train_history as history
from trainer.dist import free_port


def run_train(small_shards, out: Path, *overrides: str, ranks: int = 2, check: bool = True,
              script: str = "launch/train.sh"):
    d = {k: str(v) for k, v in small_shards.items()}
    args = [
        *DEEPSPEED,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        script,
        f"data.train_shards=[{d['domain_a']},{d['domain_b']},{d['domain_c']}]",
        f"data.eval_shards=[{d['domain_d']}]",
        f"eval.dev_shards=[{d['domain_c']}]",  # val samples: held out, fix the threshold
        f"train.output_dir={out}",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "data.num_workers=0",
        "eval.batch_size=16",
        "optim.warmup_steps=2",
        *overrides,
    ]
    proc = subprocess.run(args, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def unbroken(small_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    proc = run_train(small_shards, out, "train.max_steps=6", "train.save_every=3", "eval.every=2", "train.keep_last=1")
    return out, proc


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rank_zero3_run_trains_and_evaluates(unbroken):
    out, proc = unbroken
    losses = history(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]  # it learns something even in 6 steps (the LM part drops fast)
    assert "| held-out |" in proc.stdout  # the metrics table is printed
    # ... headed by the notice that this model only saw synthetic faces (its training_data.json)
    assert (out / "eval_metrics.md").read_text().startswith("Note: this model was trained only on synthetic shards")
    metrics = json.loads((out / "eval_metrics.json").read_text())["held-out"]
    assert metrics["num_live"] + metrics["num_spoof"] == 48  # every held-out sample, once, over 2 ranks
    # both HTERs: at the test set's EER threshold and at the one fixed on domain_c's val samples
    calibration = json.loads((out / "calibration.json").read_text())
    assert metrics["fixed_threshold"] == pytest.approx(calibration["threshold"])
    assert 0.0 <= metrics["hter_fixed"] <= 1.0 and "HTER@fixed" in proc.stdout
    assert "training skips the split='val' samples of 3 training shard(s)" in proc.stdout + proc.stderr
    # keep_last=1 keeps the last checkpoint, plus the best one by held-out HTER (periodic eval every 2 steps)
    best = json.loads((out / "best.json").read_text())
    assert best["step"] in (2, 4)
    eval_steps = [json.loads(ln)["step"] for ln in (out / "eval_history.jsonl").read_text().splitlines()]
    assert eval_steps == [2, 4, 6]
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == sorted({best["tag"], "step_00000006"})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_matches_unbroken_run(unbroken, small_shards, tmp_path):
    out, _ = unbroken
    run_train(small_shards, tmp_path, "train.max_steps=6", "train.save_every=3", "train.stop_at_step=3")
    first = history(tmp_path)
    run_train(small_shards, tmp_path, "train.max_steps=6", "train.save_every=3")  # same command, resumes
    second = history(tmp_path)
    expected = history(out)
    assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5, 6]
    for step, loss in {**first, **second}.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fused_loss_under_zero3_matches_reference(unbroken, small_shards, tmp_path):
    """The fused LM-head loss reads lm_head.weight, a ZeRO-3 shard outside its module's forward."""
    out, _ = unbroken
    run_train(
        small_shards,
        tmp_path,
        "train.max_steps=6",
        "train.save_every=6",
        "model.fused_kernels=true",
        "eval.at_end=false",
    )
    expected = history(out)
    for step, loss in history(tmp_path).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("ds_config", ["launch/ds_zero3_7b.json", "launch/ds_zero2.json"])
def test_the_real_run_deepspeed_configs_train_like_the_default(unbroken, small_shards, tmp_path, ds_config):
    """ZeRO-3 with overlapped communication and large buckets, and ZeRO-2: the same losses as the
    default ZeRO-3 config (fp32 on CPU; only the communication schedule differs)."""
    out, _ = unbroken
    run_train(small_shards, tmp_path, "train.max_steps=6", "train.save_every=3", "eval.every=2", "train.keep_last=1",
              f"train.deepspeed_config={ds_config}")
    expected = history(out)
    for step, loss in history(tmp_path).items():
        assert loss == pytest.approx(expected[step], rel=1e-5), step


@pytest.fixture(scope="module")
def exported(unbroken):
    from trainer.model.export import export_run

    return export_run(unbroken[0])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_export_loads_and_gives_the_same_scores(unbroken, exported, small_shards):
    assert_export_scores_equal_the_runs(exported, unbroken[0], small_shards["domain_d"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tensorboard_event_files_hold_the_curves(unbroken):
    out, _ = unbroken
    events = tensorboard_events(out / "tb")
    tags = set(events.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/loss_judgment",
        "train/loss_interpretation",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "train/tokens_per_s",
        "eval/held-out/hter",
        "eval/held-out/auc",
    ):
        assert tag in tags, tag
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5, 6]
    assert losses[0].value == pytest.approx(history(out)[1], rel=1e-5)
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] < lrs[1]  # warmup, then cosine decay
    assert lrs[-1] < lrs[2]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
        ("data.train_shards=[/no/such/shards]", "does not exist"),
    ],
)
def test_bad_input_stops_before_any_rank_starts(override, needle, tmp_path):
    env = launch_env(PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", "launch/train.sh", f"train.output_dir={tmp_path}", override],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ifas-train: error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "deepspeed.launcher" not in proc.stderr + proc.stdout  # no rank was ever started


def test_check_through_bash_finds_the_venv_and_runs_one_process(small_shards, tmp_path):
    """`bash launch/train.sh --check` with no venv on PATH and no PYTHON: the project's .venv runs
    the check, once, in one process, and no DeepSpeed rank starts."""
    if not (ROOT / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv in the checkout (make install creates it)")
    d = {k: str(v) for k, v in small_shards.items()}
    env = {k: v for k, v in launch_env().items() if k not in ("PYTHON", "VIRTUAL_ENV")} | {"PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        ["bash", "launch/train.sh", "--config", "launch/configs/demo.yaml", f"train.output_dir={tmp_path}",
         f"data.train_shards=[{d['domain_a']},{d['domain_b']}]", f"data.eval_shards=[{d['domain_d']}]",
         f"eval.dev_shards=[{d['domain_a']}]", "--check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("config and inputs are valid") == 1
    assert "deepspeed.launcher" not in proc.stderr + proc.stdout


def test_empty_shard_set_and_bad_tokenizer_are_refused(tmp_path, capsys, demo_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from trainer.cli.train import main

    (tmp_path / "empty").mkdir()
    assert main(["--check", f"data.train_shards=[{tmp_path / 'empty'}]"]) == 2
    assert "holds no .tar shards" in capsys.readouterr().err

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(
        ["x y"],
        trainers.BpeTrainer(
            vocab_size=260, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(tmp_path / "tok")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(b"")
    code = main(["--check", f"data.train_shards=[{shards}]", f"model.tokenizer_path={tmp_path / 'tok'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ifas-train: error:")]
    assert code == 2 and len(err) == 1 and "'Yes' as" in err[0] and "single tokens" in err[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_predict_prints_judgment_score_and_explanation(exported, small_shards, tmp_path, capsys):
    import io

    import webdataset as wds
    from PIL import Image

    from trainer.cli.predict import main

    paths = []
    for i, sample in enumerate(wds.WebDataset(str(small_shards["domain_d"] / "shard-000000.tar"), shardshuffle=False)):
        if i == 3:
            break
        paths.append(tmp_path / f"face{i}.png")
        Image.open(io.BytesIO(sample["jpg"])).save(paths[-1])
    sources = json.loads((exported / "training_data.json").read_text())  # the run's, copied by the export
    assert sources["synthetic_only"] is True and [s["name"] for s in sources["sets"]] == ["domain_a", "domain_b",
                                                                                          "domain_c"]
    assert main(["--model", str(exported), "--jsonl", "--max-new-tokens", "8", *map(str, paths)]) == 0
    captured = capsys.readouterr()
    assert "trained only on synthetic shards (domain_a, domain_b, domain_c)" in captured.err
    lines = [json.loads(ln) for ln in captured.out.splitlines()]
    assert [ln["path"] for ln in lines] == [str(p) for p in paths]
    for ln in lines:
        assert 0.0 <= ln["score"] <= 1.0 and ln["judgment"] == ("Yes" if ln["score"] >= 0.5 else "No")
        assert isinstance(ln["explanation"], str)
    assert main(["--model", str(exported), str(tmp_path / "missing.jpg")]) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("balance", [True])  # weights alone: tests/trainer/test_stream.py
def test_weighted_sources_train_and_log_their_realised_shares(small_shards, tmp_path, balance):
    a, b = small_shards["domain_a"], small_shards["domain_b"]
    out = tmp_path / "mixed"
    run_train(small_shards, out, f"data.train_shards=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]",
              f"data.balance={str(balance).lower()}", "train.max_steps=8", "train.save_every=8", "eval.at_end=false",
              "eval.dev_shards=[]")
    events = tensorboard_events(out / "tb")
    shares = {tag.removeprefix("data/source/"): events.Scalars(tag)[-1].value
              for tag in events.Tags()["scalars"] if tag.startswith("data/source/")}
    parts = ["_live", "_spoof"] if balance else [""]
    assert sorted(shares) == sorted(f"{i}_{d}{p}" for i, d in enumerate(["domain_a", "domain_b"]) for p in parts)
    assert sum(shares.values()) == pytest.approx(1.0)
    share_a = sum(v for k, v in shares.items() if k.startswith("0_"))
    assert 0.6 <= share_a <= 0.9  # 64 draws at 3:1
    if balance:
        assert 0.3 <= sum(v for k, v in shares.items() if k.endswith("_live")) <= 0.7
    assert json.loads((out / "train_result.json").read_text())["history"][-1]["source_fractions"]
