"""A tiny InternVL checkpoint saved offline with transformers' own classes, as InternVL3-1B-hf is laid
out (tied embeddings, one 448-style tile, ``<img><IMG_CONTEXT>...</img>``), with its processor."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# InternVL3-hf's template, which the Hub keeps at processor level (chat_template.jinja)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGE_SIZE, PATCH, LAYERS = 64, 8, 3
PROJECTOR_TOKENS = (IMAGE_SIZE // PATCH // 2) ** 2  # pixel shuffle: 2 x 2 patches per token


def internvl_tokenizer(demo_tokenizer) -> PreTrainedTokenizerFast:
    """The demo BPE with InternVL's named image tokens (as the -hf tokenizers list them)."""
    core = Tokenizer.from_str(demo_tokenizer.backend_tokenizer.to_str())  # a copy: the demo one stays as it is
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
        extra_special_tokens={"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>",
                              "end_image_token": "</img>", "video_token": "<video>"})


def save_checkpoint_processor(tokenizer, directory: Path) -> None:
    """What an InternVL -hf directory holds for its processor, but the video processor (transformers builds
    that with torchvision, which cannot be installed beside this machine's CPU torch)."""
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False, max_patches=1,
                             resample=Image.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)


def save_internvl(directory: Path, demo_tokenizer, seed: int = 3) -> InternVLForConditionalGeneration:
    tok = internvl_tokenizer(demo_tokenizer)
    vision = InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH, PATCH])
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
        image_seq_length=PROJECTOR_TOKENS, tie_word_embeddings=True))
    with torch.no_grad():  # transformers' init leaves these at zero/one: random values test the loading
        for name, p in model.named_parameters():
            if "layer_norm" in name or "lambda" in name or "cls_token" in name or "position" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    save_checkpoint_processor(tok, directory)
    return model
