"""A family added through the ``Family`` interface alone (tests/trainer/model/toy_family.py: one module and one
registry line, nothing in trainer/ names it) builds, encodes with its own connector, and trains 2 steps on two
ZeRO-3 ranks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import train_history
from tests.trainer.model.toy_family import ToyFamily, save_toy_checkpoint
from trainer.config import ModelConfig
from trainer.model import families
from trainer.model.build import build_model


@pytest.fixture
def toy(monkeypatch):
    """The toy family registered for one test."""
    monkeypatch.setattr(families, "FAMILIES", list(families.FAMILIES))
    return families.register(ToyFamily())


def test_a_registered_family_builds_and_encodes_with_its_own_connector(toy, tmp_path, demo_tokenizer):
    ref = save_toy_checkpoint(tmp_path / "toy", demo_tokenizer).eval()
    model, _ = build_model(ModelConfig(path=str(tmp_path / "toy")))
    model.eval()
    assert model.family is toy and model.arch.family == "toy_vl"
    assert (model.num_patch_tokens, model.num_image_tokens) == (4, 4 + 4 + 2)  # 2 x 2 pooled, prefix, layers
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.image_tokens(pixels)[0]
        patches = ref.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # [2, 16, 32]
        pooled = F.avg_pool2d(patches.transpose(1, 2).reshape(2, 32, 4, 4), 2).flatten(2).transpose(1, 2)
        proj = ref.model.multi_modal_projector
        theirs = proj.linear_2(F.gelu(proj.linear_1(pooled)))
    assert ours.shape == (2, 10, 32)
    torch.testing.assert_close(ours[:, :4], theirs, rtol=0, atol=1e-6)


def test_an_unregistered_family_is_refused(tmp_path, demo_tokenizer):
    save_toy_checkpoint(tmp_path / "toy", demo_tokenizer)
    with pytest.raises(families.ModelLoadError, match="model_type 'toy_vl' is not a supported checkpoint family"):
        build_model(ModelConfig(path=str(tmp_path / "toy")))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_registered_family_trains_on_two_zero3_ranks(small_shards, tmp_path, demo_tokenizer):
    from tests.trainer.training.test_train_e2e import run_train

    save_toy_checkpoint(tmp_path / "toy", demo_tokenizer)
    out = tmp_path / "run"
    run_train(small_shards, out, f"model.path={tmp_path / 'toy'}", "model.projector_merge=1", "train.max_steps=2",
              "eval.dev_shards=[]", "eval.at_end=false", script="tests/trainer/model/toy_family.py")
    assert sorted(train_history(out)) == [1, 2]
    assert '"family": "toy_vl"' in (out / "model_config" / "ifas_config.json").read_text()
