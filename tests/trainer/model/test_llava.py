"""A model without GAC written in LLaVA form loads with transformers' Auto classes and computes what
IFASModel computes; its processor prepares the same pixels and the same prompt ids as the trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from shards.scf import captioner_prompt
from shards.schema import CAPTION_PROMPT
from trainer.config import ModelConfig
from trainer.data import ImageTransform
from trainer.model.build import build_model
from trainer.model.llava import NotLlavaCompatible, check_llava_compatible, llava_processor, write_llava
from trainer.model.prompt import PromptBuilder


@pytest.mark.parametrize("preset", ["tiny", "tiny-siglip"])
def test_llava_form_computes_what_the_model_computes(preset, demo_tokenizer, tmp_path):
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset=preset, gac=False), demo_tokenizer)
    model.eval()
    write_llava(model.config_dict(), model.state_dict(), llava_processor(model.config_dict(), tok), tmp_path / "llava")
    llava = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(2)]
    prompt = captioner_prompt(processor, CAPTION_PROMPT)
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
    transform = ImageTransform(model.arch.image_size, model.arch.image_mean, model.arch.image_std)
    torch.testing.assert_close(inputs["pixel_values"], torch.stack([transform(im) for im in images]),
                               atol=1e-5, rtol=0)  # same pixels as in training
    builder = PromptBuilder(tok, model.num_image_tokens, 256, caption_prompt=prompt)
    assert inputs["input_ids"][0].tolist() == builder.prompt_ids  # same prompt ids as in training

    with torch.no_grad():
        theirs = llava(**inputs).logits
        embeds = model.embed(inputs["input_ids"], inputs["pixel_values"])
        ours = model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_caption_answers_are_the_caption_alone(demo_tokenizer):
    from trainer.model.loss import IGNORE_INDEX, INTERPRETATION

    builder = PromptBuilder(demo_tokenizer, 4, 64, caption_prompt="<image>\nDescribe it.\n")
    enc = builder.encode(False, " halftone dots on paper ")
    n = len(builder.prompt_ids)
    caption_ids = demo_tokenizer.encode("halftone dots on paper", add_special_tokens=False)
    assert enc.input_ids[n:] == caption_ids + [demo_tokenizer.eos_token_id]
    assert enc.labels == [IGNORE_INDEX] * n + caption_ids + [demo_tokenizer.eos_token_id]
    assert set(enc.label_groups[n:]) == {INTERPRETATION}  # no judgment token
    assert builder.prompt_ids.count(builder.image_token_id) == 4


def test_models_llava_cannot_hold_are_refused(demo_tokenizer):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(preset="tiny"), demo_tokenizer)
    with pytest.raises(NotLlavaCompatible, match="model.gac=false"):
        check_llava_compatible(model.config_dict()["arch"])
    with pytest.raises(NotLlavaCompatible, match="model.projector_merge=1"):
        check_llava_compatible({"gac": False, "projector_merge": 2})


def test_caption_task_config_is_checked_before_any_rank_starts():
    from trainer.config import ConfigError, load_config

    ok = ["data.task=caption", "loss.mode=plain", "model.gac=false"]
    assert load_config(None, ok).data.task == "caption"
    for extra, message in [(["loss.mode=lopsided"], "set loss.mode=plain"),
                           (["model.gac=true"], "model.gac=false"),
                           (["data.eval_shards=[x]"], "no liveness evaluation"),
                           (["data.task=vqa"], "data.task must be fas or caption")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ok + extra)
