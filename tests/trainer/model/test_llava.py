"""A model without GAC written in LLaVA form loads with transformers' Auto classes and computes what
IFASModel computes; its processor prepares the same pixels and the same prompt ids as the trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from shards.scf import captioner_prompt
from shards.schema import CAPTION_PROMPT, QUESTION
from trainer.config import ModelConfig
from trainer.data import ImageTransform
from trainer.model.build import build_model
from trainer.model.families.base import NotFamilyCompatible
from trainer.model.families.hf_format import check_family_compatible, write_family
from trainer.model.families.llava import llava_processor
from trainer.sample.prompt import PromptBuilder


@pytest.mark.parametrize("preset", ["tiny", "tiny-siglip"])
def test_llava_form_computes_what_the_model_computes(preset, demo_tokenizer, tmp_path):
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(preset=preset, gac=False), demo_tokenizer)
    model.eval()
    llava_processor(model.config_dict(), tok).save_pretrained(tmp_path / "processor")
    write_family(model.config_dict(), model.state_dict(), tmp_path / "processor", tmp_path / "llava")
    llava = AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(2)]
    prompt = captioner_prompt(processor, CAPTION_PROMPT)
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
    transform = ImageTransform.for_model(model.arch)
    torch.testing.assert_close(inputs["pixel_values"], torch.stack([transform(im) for im in images]),
                               atol=1e-5, rtol=0)  # same pixels as in training
    builder = PromptBuilder(tok, model.num_image_tokens, 256, caption_prompt=prompt)
    assert inputs["input_ids"][0].tolist() == builder.prompt_ids  # same prompt ids as in training

    with torch.no_grad():
        theirs = llava(**inputs).logits
        embeds = model.embed(inputs["input_ids"], inputs["pixel_values"])[0]
        ours = model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_caption_answers_are_the_caption_alone(demo_tokenizer):
    from trainer.sample import IGNORE_INDEX, INTERPRETATION

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
    with pytest.raises(NotFamilyCompatible, match="model.gac=false"):
        check_family_compatible(model.config_dict()["arch"])
    with pytest.raises(NotFamilyCompatible, match="model.projector_merge=1"):
        check_family_compatible({"gac": False, "projector_merge": 2})


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


LLAVA15_TEMPLATE = (  # llava-1.5-hf's processor-level template, as its chat_template.json holds it
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def bos_tokenizer():
    """A Llama-like tokenizer: adds <s> in front of every text, has no chat template of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(["Yes. No. Yes, No"] * 50 + ["USER: ASSISTANT: Is this photo of a real person?"] * 20,
                             trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<image>", "<pad>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_prompt_is_the_processors_own_with_its_template_and_bos(demo_tokenizer, tmp_path):
    """A llava-hf checkpoint keeps its chat template at processor level and its tokenizer adds BOS:
    the training prompt is token for token what its processor makes of its own template."""
    from trainer.sample.tokenizer import load_tokenizer

    tok = bos_tokenizer()
    model, _ = build_model(ModelConfig(preset="tiny", gac=False), demo_tokenizer)
    processor = llava_processor(model.config_dict(), tok, chat_template=LLAVA15_TEMPLATE)
    processor.save_pretrained(tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert loaded.chat_template == LLAVA15_TEMPLATE  # found beside the tokenizer, not invented
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    theirs = processor(images=[image], text=[text])["input_ids"][0]
    ours = PromptBuilder(loaded, model.num_image_tokens, 256).prompt_ids
    assert list(theirs) == ours and ours[0] == loaded.bos_token_id


def test_a_checkpoint_without_any_chat_template_is_refused(tmp_path):
    from trainer.sample.tokenizer import TokenizerError, load_tokenizer

    bos_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(TokenizerError, match="has no chat template"):
        load_tokenizer(tmp_path / "tok")
