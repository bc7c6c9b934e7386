"""Tiny checkpoints of the checkpoint families, saved offline with transformers' own classes and laid out as
the Hub's -hf releases are (tokenizer naming its image tokens, processor-level chat template, image
processor), with random weights; and the same families' own code paths the tests compare against."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen2Config

IMAGE_SIZE = 64
LAYERS = 3
GAC_TOKENS = 4 + LAYERS  # prefix queries + one per vision layer

# InternVL3-hf's template (the Hub keeps it at processor level, chat_template.jinja)
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
# llava-onevision-qwen2's (ChatML, the image first in its turn)
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# llava-v1.6-mistral's ([INST] ... [/INST], the image first)
NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% endif %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'user' %}{{ ' [/INST]' }}{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)


def family_tokenizer(demo_tokenizer, **named_tokens: str) -> PreTrainedTokenizerFast:
    """The demo BPE (a copy) naming the family's image tokens, as the -hf tokenizers do; no template of
    its own (the checkpoints keep it at processor level)."""
    core = Tokenizer.from_str(demo_tokenizer.backend_tokenizer.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   extra_special_tokens=named_tokens)


def _text_config(tok, tied: bool) -> Qwen2Config:
    return Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=tied)


def _randomise_constants(model) -> None:
    """transformers' init leaves norms, class tokens and scales at 0 or 1: random values test the loading."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("norm", "lambda", "cls_token", "position", "image_newline")):
                p.add_(torch.randn_like(p) * 0.1)


def _same_pixels(x: torch.Tensor) -> torch.Tensor:
    return x


def _anyres_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x, x], dim=-4)  # the whole image, then its one tile


@dataclass(frozen=True)
class FamilyCase:
    """One family as the tests use it."""

    name: str
    projector_tokens: int  # image tokens the checkpoint's own connector gives a face
    save: Callable[[Path, object], torch.nn.Module]  # (directory, demo tokenizer) -> the saved model
    image_features: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # the family's own, [B, N, D]
    layer_outputs: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]]  # vision layers, one by one
    # [..., 3, S, S] images (ImageTransform's) -> the pixel_values the family's processor and model take
    family_pixels: Callable[[torch.Tensor], torch.Tensor] = _same_pixels
    model_kw: dict = field(default_factory=dict)  # ModelConfig keys the checkpoint needs


# ----- InternVL -----
def save_internvl(directory: Path, demo_tokenizer):
    from PIL import Image
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = family_tokenizer(demo_tokenizer, context_image_token="<IMG_CONTEXT>", start_image_token="<img>",
                           end_image_token="</img>", video_token="<video>")
    vision = InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[8, 8])
    torch.manual_seed(3)
    model = InternVLForConditionalGeneration(InternVLConfig(  # tied embeddings, as InternVL3-1B's Qwen2.5-0.5B
        vision_config=vision, text_config=_text_config(tok, tied=True), image_token_id=tok.context_image_token_id,
        image_seq_length=16, tie_word_embeddings=True))
    _randomise_constants(model)
    model.save_pretrained(directory)
    # the -hf directory's processor files but the video processor (transformers builds that with torchvision,
    # which cannot be installed beside this machine's CPU torch)
    GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False, max_patches=1,
                             resample=Image.BICUBIC, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)
    return model


def _internvl_features(ref, px):
    return ref.model.get_image_features(pixel_values=px, vision_feature_layer=-1,
                                        vision_feature_select_strategy="default").pooler_output


def _internvl_layers(vision, px):
    h, out = vision.embeddings(px), []
    for layer in vision.encoder.layer:
        h = layer(h)
        out.append(h)
    return out


# ----- LLaVA -----
LLAVA_TEMPLATE = NEXT_TEMPLATE.replace("[INST] ", "USER: ").replace(" [/INST]", " ASSISTANT:")  # llava-1.5's shape


def save_llava(directory: Path, demo_tokenizer):
    from PIL import Image
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = family_tokenizer(demo_tokenizer, image_token="<image>")
    torch.manual_seed(6)
    model = LlavaForConditionalGeneration(LlavaConfig(  # CLIP-L/336 + an untied LLM, as llava-1.5
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16),
        text_config=_text_config(tok, tied=False), image_token_index=tok.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default"))
    _randomise_constants(model)
    model.save_pretrained(directory)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                   "width": IMAGE_SIZE}, resample=Image.BICUBIC)
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE).save_pretrained(directory)
    return model


def _llava_features(ref, px):
    config = ref.config
    return torch.stack(list(ref.model.get_image_features(
        pixel_values=px, vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output))


# ----- LLaVA-NeXT and LLaVA-OneVision -----
PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
             [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def _save_anyres(directory: Path, demo_tokenizer, family: str):
    from PIL import Image
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        SiglipVisionConfig,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    vision_kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                     image_size=IMAGE_SIZE, patch_size=16)
    torch.manual_seed(4)
    if family == "llava_next":  # CLIP-L/336 + an untied LLM, as llava-v1.6-mistral
        tok = family_tokenizer(demo_tokenizer, image_token="<image>")
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(
            vision_config=CLIPVisionConfig(**vision_kw), text_config=_text_config(tok, tied=False),
            image_token_index=tok.image_token_id, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
            vision_feature_select_strategy="default"))
        images = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_grid_pinpoints=PINPOINTS, resample=Image.BICUBIC)
        LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=16,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                           chat_template=NEXT_TEMPLATE).save_pretrained(directory)
    else:  # SigLIP + tied Qwen2, as llava-onevision-qwen2-0.5b
        tok = family_tokenizer(demo_tokenizer, image_token="<image>", video_token="<video>")
        model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**vision_kw), text_config=_text_config(tok, tied=True),
            image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
            image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="full",
            tie_word_embeddings=True))
        LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                        image_grid_pinpoints=PINPOINTS).save_pretrained(directory)
        tok.save_pretrained(directory)
        (directory / "chat_template.jinja").write_text(ONEVISION_TEMPLATE)
    _randomise_constants(model)
    model.save_pretrained(directory)
    return model


def _anyres_features(ref, px):
    """The family's own features of square faces: base image + its one tile (the same pixels)."""
    config = ref.config
    kw = {"vision_feature_select_strategy": config.vision_feature_select_strategy}
    out = ref.model.get_image_features(pixel_values=torch.stack([px, px], dim=1),
                                       image_sizes=torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * len(px)),
                                       vision_feature_layer=config.vision_feature_layer, **kw).pooler_output
    return torch.stack(list(out))


def _clip_or_siglip_layers(vision, px):
    h = vision.embeddings(px)
    h, out = (vision.pre_layrnorm(h) if hasattr(vision, "pre_layrnorm") else h), []  # CLIP's norm before layer 1
    for layer in vision.encoder.layers:
        h = layer(h, None)
        out.append(h)
    return out


# ----- Qwen2-VL and Qwen2.5-VL -----
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_PATCH = 8


def _save_qwen(directory: Path, demo_tokenizer, family: str):
    import transformers
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = family_tokenizer(demo_tokenizer, image_token="<|image_pad|>", video_token="<|video_pad|>",
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    common = dict(depth=LAYERS, num_heads=4, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":  # blocks 48 wide, the merger out at the LLM's 64, as Qwen2-VL's embed_dim/hidden_size
        vision, cls = dict(embed_dim=48, hidden_size=64, mlp_ratio=2, **common), transformers.Qwen2VLConfig
        model_cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":  # window attention in all blocks but the last, as Qwen2.5-VL's
        vision = dict(hidden_size=48, out_hidden_size=64, intermediate_size=96, window_size=32,
                      fullatt_block_indexes=[LAYERS - 1], **common)
        cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:  # learned position grid and deepstack features from two inner blocks, as Qwen3-VL's
        vision = dict(hidden_size=48, out_hidden_size=64, intermediate_size=96, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1], **common)
        cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    rope = ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}} if family != "qwen3_vl" else
            {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True}})
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, **rope)
    torch.manual_seed(7)
    model = model_cls(cls(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                          video_token_id=tok.video_token_id, vision_start_token_id=tok.vision_start_token_id,
                          vision_end_token_id=tok.vision_end_token_id, tie_word_embeddings=True))
    _randomise_constants(model)
    model.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2, patch_size=QWEN_PATCH,
                             merge_size=2, temporal_patch_size=2, resample=Image.BICUBIC).save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return model


def _qwen_pixels(x: torch.Tensor) -> torch.Tensor:
    from trainer.model.families.mrope import patchify

    return patchify(x.reshape(-1, *x.shape[-3:]), QWEN_PATCH, 2, 2)[0]


def _qwen_features(ref, px):
    from trainer.model.families.mrope import patchify

    flat, grid = patchify(px, QWEN_PATCH, 2, 2)
    return torch.stack(list(ref.model.get_image_features(pixel_values=flat, image_grid_thw=grid).pooler_output))


def _qwen_layers(vision, px):
    """Each block's output, taken by a forward hook on the block (Qwen's blocks need the tower's window
    and rotary inputs, so they cannot be run one by one outside it)."""
    from trainer.model.families.mrope import patchify

    out = []
    hooks = [block.register_forward_hook(lambda m, a, o: out.append(o.reshape(len(px), -1, o.shape[-1])))
             for block in vision.blocks]
    flat, grid = patchify(px, QWEN_PATCH, 2, 2)
    vision(flat, grid_thw=grid)
    for h in hooks:
        h.remove()
    return out


GRID = IMAGE_SIZE // 16
QWEN_TOKENS = (IMAGE_SIZE // QWEN_PATCH // 2) ** 2
FAMILY_CASES = {
    "llava": FamilyCase("llava", GRID * GRID, save_llava, _llava_features, _clip_or_siglip_layers),
    "internvl": FamilyCase("internvl", (IMAGE_SIZE // 8 // 2) ** 2, save_internvl, _internvl_features,
                           _internvl_layers),
    "llava_next": FamilyCase("llava_next", GRID * GRID + GRID * (GRID + 1),
                             lambda d, tok: _save_anyres(d, tok, "llava_next"), _anyres_features,
                             _clip_or_siglip_layers, _anyres_pixels),
    "llava_onevision": FamilyCase("llava_onevision", GRID * GRID + GRID * (GRID + 1),
                                  lambda d, tok: _save_anyres(d, tok, "llava_onevision"), _anyres_features,
                                  _clip_or_siglip_layers, _anyres_pixels),
    "qwen2_vl": FamilyCase("qwen2_vl", QWEN_TOKENS, lambda d, tok: _save_qwen(d, tok, "qwen2_vl"), _qwen_features,
                           _qwen_layers, _qwen_pixels, {"image_size": IMAGE_SIZE}),
    "qwen2_5_vl": FamilyCase("qwen2_5_vl", QWEN_TOKENS, lambda d, tok: _save_qwen(d, tok, "qwen2_5_vl"),
                             _qwen_features, _qwen_layers, _qwen_pixels, {"image_size": IMAGE_SIZE}),
    "qwen3_vl": FamilyCase("qwen3_vl", QWEN_TOKENS, lambda d, tok: _save_qwen(d, tok, "qwen3_vl"),
                           _qwen_features, _qwen_layers, _qwen_pixels, {"image_size": IMAGE_SIZE}),
}


def checkpoint_processor(name: str, directory: Path):
    """The checkpoint's processor, built by transformers' own class from the saved files. The video slot of
    InternVL's and OneVision's is left empty (the caller lets ProcessorMixin accept that): transformers
    builds their video processors with torchvision, which this machine's CPU torch cannot have."""
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    if name in ("llava", "llava_next"):
        return transformers.AutoProcessor.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    template = (directory / "chat_template.jinja").read_text()
    if name.startswith("qwen"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
               "qwen3_vl": transformers.Qwen3VLProcessor}[name]
        return cls(image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory), tokenizer=tok,
                   video_processor=None, chat_template=template)
    if name == "internvl":
        return transformers.InternVLProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(directory),
                                              tokenizer=tok, video_processor=None, image_seq_length=16,
                                              chat_template=template)
    return transformers.LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(directory), tokenizer=tok,
        video_processor=None, num_image_tokens=GRID * GRID, vision_feature_select_strategy="full",
        chat_template=template)
