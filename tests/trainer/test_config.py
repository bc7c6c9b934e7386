import pytest

from trainer.config import ConfigError, load_config, parse_overrides


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 7\n  micro_batch_size: 3\ndata:\n  train_shards: [a]\n")
    cfg = load_config(path, ["train.max_steps=11", "data.train_shards=[x,y]", "optim.lr=5e-4", "loss.alpha=0.5"])
    assert cfg.train.max_steps == 11 and cfg.train.micro_batch_size == 3
    assert cfg.data.train_shards == ["x", "y"]
    assert cfg.optim.lr == pytest.approx(5e-4) and cfg.loss.alpha == 0.5


def test_single_path_becomes_list():
    assert load_config(None, ["data.train_shards=some/dir"]).data.train_shards == ["some/dir"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_step=5", "unknown config key 'train.max_step'"),
        ("trian.max_steps=5", "unknown config key 'trian'"),
        ("train.max_steps=many", "'train.max_steps': expected an integer"),
        ("loss.alpha=1.5", "loss.alpha must be in [0, 1]"),
        ("optim.freeze=[brain]", "unknown module group 'brain'"),
        ("train.max_steps", "not of the form"),
        ("eval.batch_size=-1", "eval.batch_size must be >= 1, got -1"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
        ("data.num_workers=-2", "data.num_workers must be >= 0 (or -1: from the CPUs per rank), got -2"),
        ("model.gac_heads=0", "model.gac_heads must be >= 1, got 0"),
        ("train.keep_last=-1", "train.keep_last must be >= 0, got -1"),
    ],
)
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.d=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}}


def test_model_llava_path_is_the_old_name_of_model_path():
    assert load_config(None, ["model.llava_path=/m/llava"]).model.path == "/m/llava"
    assert load_config(None, ["model.llava_path=/m/llava", "model.path=/m/llava"]).model.path == "/m/llava"
    with pytest.raises(ConfigError, match="model.llava_path is the old name of model.path"):
        load_config(None, ["model.llava_path=/m/a", "model.path=/m/b"])


def test_an_override_under_either_name_replaces_the_files_model_path(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  path: /m/from_file\n")
    assert load_config(tmp_path / "run.yaml", ["model.llava_path=/m/cli"]).model.path == "/m/cli"
    (tmp_path / "old.yaml").write_text("model:\n  llava_path: /m/from_file\n")
    assert load_config(tmp_path / "old.yaml", ["model.path=/m/cli"]).model.path == "/m/cli"


def test_check_refuses_a_negative_eval_batch_size_before_any_rank_starts(small_shards, tmp_path):
    """eval.batch_size=-1 used to pass --check, train, save, then crash at the final evaluation."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import launch_env

    proc = subprocess.run([sys.executable, "-m", "trainer.cli.train", "--check", "eval.batch_size=-1",
                           f"data.train_shards=[{small_shards['domain_a']}]", f"train.output_dir={tmp_path / 'run'}"],
                          cwd=Path(__file__).resolve().parents[2], env=launch_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ifas-train: error:")]
    assert errors == ["ifas-train: error: eval.batch_size must be >= 1, got -1"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["predict", "eval"])
def test_the_commands_refuse_a_size_below_its_least_before_loading_anything(command, tmp_path, capsys):
    from trainer.cli.eval import main as eval_main
    from trainer.cli.predict import main as predict_main

    main = {"predict": predict_main, "eval": eval_main}[command]
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tmp_path / "no-model"), "--batch-size", "-1", str(tmp_path)])
    assert exc.value.code == 2
    assert "--batch-size: '-1' is not an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, needle", [
    (["train.stage=rl"], "train.stage must be sft or grpo"),
    (["train.stage=grpo"], "model.init_from"),
    (["train.stage=grpo", "model.init_from=runs/demo", "grpo.group_size=1"], "grpo.group_size must be >= 2"),
    (["train.stage=grpo", "model.init_from=runs/demo", "grpo.alpha=1.5"], "grpo.alpha must be in [0, 1]"),
    (["train.stage=grpo", "model.init_from=runs/demo", "grpo.reward_wrong_cue=1"], "is a penalty"),
    (["train.stage=grpo", "model.init_from=runs/demo", "data.answer_style=judgment"], "answer_style=caption"),
    (["train.stage=grpo", "model.init_from=runs/demo", "grpo.min_words=9", "grpo.max_words=3"], "min_words"),
])
def test_grpo_stage_config_is_checked(overrides, needle):
    with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
        load_config(None, overrides)


def test_the_demo_grpo_config_loads():
    from tests.helpers import ROOT

    cfg = load_config(ROOT / "launch/configs/demo_grpo.yaml")
    assert cfg.train.stage == "grpo" and cfg.model.init_from == "runs/demo" and cfg.eval.explain_samples >= 200
