"""Pieces of the training loop that need no process group: parameter groups, schedule, DeepSpeed config."""
import json
import math

import pytest

from trainer.config import ModelConfig, load_config
from trainer.model.build import build_model
from trainer.training.engine import deepspeed_config, lr_lambda, param_groups


@pytest.fixture(scope="module")
def model(demo_tokenizer):
    return build_model(ModelConfig(preset="tiny", projector_merge=2), demo_tokenizer)[0]


def test_freezing_and_per_module_learning_rates(model):
    cfg = load_config(None, ["optim.freeze=[vision]", "optim.lr=1e-3", "optim.lr_scale={gac: 10.0, llm: 0.5}"])
    groups = param_groups(model, cfg)
    assert not any(p.requires_grad for p in model.vision.parameters())
    by_name = {g["name"]: g for g in groups}
    assert not any(name.startswith("vision") for name in by_name)
    assert by_name["gac"]["lr"] == pytest.approx(1e-2) and by_name["llm"]["lr"] == pytest.approx(5e-4)
    assert by_name["projector"]["lr"] == pytest.approx(1e-3)
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith(".no_decay"))
    assert all(p.ndim < 2 for p in by_name["llm.no_decay"]["params"])
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)


def test_warmup_then_cosine():
    values = [lr_lambda(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_deepspeed_config_takes_the_run_config(tmp_path):
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=2", "optim.grad_clip=0.5",
                             "optim.lr=2e-5"])
    cpu = deepspeed_config(cfg, on_cuda=False)
    assert cpu["train_micro_batch_size_per_gpu"] == 3 and cpu["gradient_accumulation_steps"] == 2
    assert cpu["gradient_clipping"] == 0.5 and cpu["zero_optimization"]["stage"] == 3
    assert cpu["optimizer"]["params"]["lr"] == pytest.approx(2e-5)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["bf16"]["enabled"] is False
    gpu = deepspeed_config(cfg, on_cuda=True)
    assert gpu["bf16"]["enabled"] is True
    # torch's AdamW on both (DeepSpeed's FusedAdam would JIT-compile with nvcc), fused kernel on CUDA
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    assert "fused" not in cpu["optimizer"]["params"]
    json.dumps(gpu)  # stays serialisable for DeepSpeed


def test_default_deepspeed_config_is_found_from_any_working_directory(small_shards, tmp_path, monkeypatch):
    from trainer.config import PROJECT_ROOT, ConfigError
    from trainer.training.engine import deepspeed_config_path
    from trainer.training.inputs import check_inputs

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"data.train_shards=[{small_shards['domain_a']}]"])
    check_inputs(cfg)
    assert deepspeed_config_path(cfg) == PROJECT_ROOT / "launch" / "ds_zero3.json"
    assert deepspeed_config(cfg, on_cuda=False)["zero_optimization"]["stage"] == 3
    cfg = load_config(None, [f"data.train_shards=[{small_shards['domain_a']}]", "train.deepspeed_config=my/ds.json"])
    with pytest.raises(ConfigError, match="train.deepspeed_config my/ds.json does not exist"):
        check_inputs(cfg)


def test_the_shipped_deepspeed_configs_parse_with_deepspeeds_own_model():
    import json

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from trainer.config import PROJECT_ROOT

    zero = {name: DeepSpeedZeroConfig(**json.loads((PROJECT_ROOT / "launch" / name).read_text())["zero_optimization"])
            for name in ("ds_zero3.json", "ds_zero3_7b.json", "ds_zero3_hpz.json", "ds_zero2.json")}
    assert [z.stage for z in zero.values()] == [3, 3, 3, 2]
    assert zero["ds_zero3_7b.json"].overlap_comm and zero["ds_zero3_7b.json"].prefetch_bucket_size == 5e8
    assert zero["ds_zero3_hpz.json"].zero_hpz_partition_size == 8 and zero["ds_zero2.json"].overlap_comm
