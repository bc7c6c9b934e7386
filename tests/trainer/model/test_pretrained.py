"""Pretrained weights streamed into the I-FAS model (trainer/model/pretrained.py): checkpoints saved here
with the real transformers classes, in today's and the older llava-hf file layout, as a full CLIPModel,
with a vocabulary the tokenizer outgrows; and the 2-rank ZeRO-3 partitioned build against a plain load."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2ForCausalLM,
)

from tests.helpers import DEEPSPEED, ROOT, launch_env, save_image_processor
from tests.trainer.model.test_ifas import _tiny_vision_text, assert_same_weights
from trainer.config import ModelConfig
from trainer.dist import free_port
from trainer.model.arch import ModelLoadError
from trainer.model.build import build_model
from trainer.model.ifas import IFASModel

# File layouts of llava-hf checkpoints, as functions of the module's state-dict name: what transformers
# 4.x saved (and the Hub's llava-1.5-7b-hf holds), and the module names themselves.
LLAVA_FILE_LAYOUTS = {
    "transformers-4": [("model.vision_tower.", "vision_tower.vision_model."),
                       ("model.multi_modal_projector.", "multi_modal_projector."),
                       ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
    "module-names": [],
}


def save_llava(directory: Path, tokenizer, tied: bool = False, seed: int = 1) -> LlavaForConditionalGeneration:
    vision, text = _tiny_vision_text(len(tokenizer))
    text.tie_word_embeddings = tied
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=tied,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>")))
    llava.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_image_processor(directory, vision.image_size)
    return llava


def assert_llava_loaded(model, llava):
    assert_same_weights(model.vision, llava.model.vision_tower)
    assert_same_weights(model.projector, llava.model.multi_modal_projector)
    assert_same_weights(model.llm.model, llava.model.language_model)
    torch.testing.assert_close(model.llm.lm_head.weight, llava.lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("layout", sorted(LLAVA_FILE_LAYOUTS))
def test_other_llava_hf_file_layouts_load_like_todays(layout, demo_tokenizer, tmp_path):
    llava = save_llava(tmp_path / "llava", demo_tokenizer)
    renamed = {}
    for name, value in llava.state_dict().items():
        for module_prefix, file_prefix in LLAVA_FILE_LAYOUTS[layout]:
            if name.startswith(module_prefix):
                name = file_prefix + name[len(module_prefix):]
                break
        renamed[name] = value.contiguous()
    assert renamed.keys() != load_file(tmp_path / "llava" / "model.safetensors").keys()
    save_file(renamed, str(tmp_path / "llava" / "model.safetensors"), metadata={"format": "pt"})
    model, _ = build_model(ModelConfig(path=str(tmp_path / "llava")))
    assert_llava_loaded(model, llava)


def test_a_full_clip_checkpoint_seeds_the_vision_tower_only(demo_tokenizer, tmp_path):
    vision, text = _tiny_vision_text(len(demo_tokenizer))
    torch.manual_seed(3)
    clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)))
    clip.save_pretrained(tmp_path / "clip")
    llm = Qwen2ForCausalLM(text)
    llm.save_pretrained(tmp_path / "llm")
    demo_tokenizer.save_pretrained(tmp_path / "llm")
    model, _ = build_model(ModelConfig(vision_path=str(tmp_path / "clip"), llm_path=str(tmp_path / "llm")))
    assert_same_weights(model.vision, clip.vision_model)
    assert_same_weights(model.llm, llm)


def test_tied_embeddings_load_once_and_stay_tied(demo_tokenizer, tmp_path):
    llava = save_llava(tmp_path / "llava", demo_tokenizer, tied=True)
    model, _ = build_model(ModelConfig(path=str(tmp_path / "llava")))
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    assert_llava_loaded(model, llava)


def test_new_vocabulary_rows_start_at_the_mean_embedding(demo_tokenizer, tmp_path):
    vision, text = _tiny_vision_text(len(demo_tokenizer) - 3)  # the tokenizer has 3 tokens the LLM lacks
    torch.manual_seed(4)
    llm = Qwen2ForCausalLM(text)
    llm.save_pretrained(tmp_path / "llm")
    demo_tokenizer.save_pretrained(tmp_path / "llm")
    from transformers import CLIPVisionModel

    CLIPVisionModel(vision).save_pretrained(tmp_path / "vision")
    model, _ = build_model(ModelConfig(vision_path=str(tmp_path / "vision"), llm_path=str(tmp_path / "llm")))
    for ours, theirs in ((model.llm.model.embed_tokens.weight, llm.model.embed_tokens.weight),
                         (model.llm.lm_head.weight, llm.lm_head.weight)):
        assert ours.shape[0] == len(demo_tokenizer)
        torch.testing.assert_close(ours[: theirs.shape[0]], theirs, rtol=0, atol=0)
        torch.testing.assert_close(ours[theirs.shape[0]:], theirs.mean(0).expand(3, -1))


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(demo_tokenizer, tmp_path):
    save_llava(tmp_path / "llava", demo_tokenizer)
    tensors = load_file(tmp_path / "llava" / "model.safetensors")
    dropped = next(k for k in tensors if "layers.1.mlp" in k)
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "llava" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"llava lacks 1 tensor\(s\) the model needs"):
        build_model(ModelConfig(path=str(tmp_path / "llava")))


def test_a_tensor_of_the_wrong_shape_is_refused_naming_it(demo_tokenizer, tmp_path):
    save_llava(tmp_path / "llava", demo_tokenizer)
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config["text_config"]["num_key_value_heads"] = 2  # a config.json that does not match the weights
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    # more rows than the file's, as a grown vocabulary would have, but not a vocabulary tensor
    wrong = r"k_proj\.(weight|bias) has shape \[16(, 32)?\], the model's llm\.model\.layers\.0\.self_attn\.k_proj"
    with pytest.raises(ModelLoadError, match=wrong):
        build_model(ModelConfig(path=str(tmp_path / "llava")))


def test_the_build_takes_the_training_dtype_not_the_checkpoint_configs(demo_tokenizer, tmp_path):
    save_llava(tmp_path / "llava", demo_tokenizer)
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    for level in (config, config["text_config"], config["vision_config"]):
        level["dtype"] = "bfloat16"  # as Hub configs say
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    model, tok = build_model(ModelConfig(path=str(tmp_path / "llava")))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.save_pretrained(tmp_path / "export", tok)
    again, _ = IFASModel.from_pretrained(tmp_path / "export", dtype=torch.float32)
    assert {p.dtype for p in again.parameters()} == {torch.float32}


WORKER = """
import json, sys, torch
from pathlib import Path
import deepspeed
from trainer.config import ModelConfig
from trainer.dist import finish_process, init_distributed, shutdown_distributed
from trainer.model.build import build_model

info = init_distributed(600)
out, checkpoint = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out = Path(out)
ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
torch.manual_seed(0)
model, _ = build_model(ModelConfig(path=checkpoint), zero3_config=ds)
params = list(model.parameters())
local = sum(p.ds_tensor.numel() for p in params)
full = sum(p.ds_numel for p in params)
state = {}
for name, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        state[name] = p.data.clone()
tied = model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
if info.rank == 0:
    torch.save(state, out / "state.pt")
(out / f"rank{info.rank}.json").write_text(json.dumps({"local": local, "full": full, "tied": tied}))
shutdown_distributed()
sys.exit(finish_process(0))  # past gloo's teardown abort at interpreter exit (trainer/dist.py)
"""


@pytest.mark.slow
def test_two_rank_partitioned_build_equals_a_plain_load(demo_tokenizer, tmp_path):
    llava = save_llava(tmp_path / "llava", demo_tokenizer, tied=True)
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [*DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(tmp_path / "worker.py"),
           str(tmp_path), str(tmp_path / "llava")]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # each rank holds half of every parameter (rounded up), never the whole model
        assert r["tied"] and r["full"] / 2 <= r["local"] < r["full"] / 2 + 1000
    torch.manual_seed(0)  # as the ranks: the GAC, which no checkpoint holds, starts from the same init
    plain, _ = build_model(ModelConfig(path=str(tmp_path / "llava")))
    gathered = torch.load(tmp_path / "state.pt")
    reference = dict(plain.named_parameters())
    assert gathered.keys() == reference.keys()
    differ = [n for n, v in reference.items() if not torch.equal(gathered[n], v.detach())]
    assert not differ, f"{len(differ)} of {len(reference)} differ: {differ[:8]}"
    assert_llava_loaded(plain, llava)


def test_init_from_an_export_takes_its_architecture_tokenizer_and_every_weight(tiny_model_dir):
    exported, exported_tok = IFASModel.from_pretrained(tiny_model_dir)
    model, tok = build_model(ModelConfig(init_from=str(tiny_model_dir), projector_merge=1, gac=False))
    assert model.arch == exported.arch and len(tok) == len(exported_tok)  # the export's, not the keys given
    assert_same_weights(model, exported)


def test_init_from_with_another_weight_source_is_refused():
    from trainer.config import ConfigError, load_config

    for other in ("model.llava_path=/y", "model.tokenizer_path=/t"):
        with pytest.raises(ConfigError, match="model.init_from starts from an I-FAS export"):
            load_config(None, ["model.init_from=/x", other])


def test_a_sharded_checkpoint_loads_from_its_index(demo_tokenizer, tmp_path):
    llava = save_llava(tmp_path / "llava", demo_tokenizer)
    llava.save_pretrained(tmp_path / "llava", max_shard_size="100KB")
    assert len(list((tmp_path / "llava").glob("model-*-of-*.safetensors"))) > 1
    model, _ = build_model(ModelConfig(path=str(tmp_path / "llava")))
    assert_llava_loaded(model, llava)
