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
