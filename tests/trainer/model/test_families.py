"""Checkpoint families (trainer/model/families/), each with a tiny checkpoint saved here by transformers'
own classes (tests/trainer/model/family_checkpoints.py): the image tokens are the checkpoint's own
connector's, the GAC reads every vision layer, the prompt and pixels are its processor's own, a model
without GAC exported in the family's format loads with AutoModelForImageTextToText and scores the same,
2 ZeRO-3 ranks train it with GAC and its export scores as the engine did; an unsupported model type is
refused by --check within seconds."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from shards.schema import QUESTION
from tests.helpers import ROOT, assert_export_scores_equal_the_runs, launch_env
from tests.trainer.model.family_checkpoints import (
    FAMILY_CASES,
    GAC_TOKENS,
    IMAGE_SIZE,
    LAYERS,
    checkpoint_processor,
)
from tests.trainer.model.test_ifas import assert_same_weights
from trainer.config import ModelConfig
from trainer.data import ImageTransform
from trainer.model.build import build_model
from trainer.sample.prompt import PromptBuilder

FAMILIES = sorted(FAMILY_CASES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, demo_tokenizer):
    """(case, checkpoint directory, the saved transformers model)."""
    case = FAMILY_CASES[request.param]
    directory = tmp_path_factory.mktemp(case.name)
    return case, directory, case.save(directory, demo_tokenizer).eval()


def pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))


def build(case, directory, **kw):
    model, tok = build_model(ModelConfig(path=str(directory), **case.model_kw, **kw))
    return model.eval(), tok


def test_weights_and_image_tokens_are_the_checkpoints_own(family):
    case, directory, ref = family
    model, _ = build(case, directory)
    assert model.arch.family == case.name
    assert (model.num_patch_tokens, model.num_image_tokens) == (case.projector_tokens,
                                                                case.projector_tokens + GAC_TOKENS)
    assert_same_weights(model.vision, getattr(ref.model, "vision_tower", None) or ref.model.visual)
    assert_same_weights(model.llm.model, ref.model.language_model)
    if model.projector is not None:  # Qwen-VL's merger is in its vision tower, compared above
        torch.testing.assert_close(model.projector.linear_1.weight, ref.model.multi_modal_projector.linear_1.weight,
                                   rtol=0, atol=0)
    tied = ref.config.tie_word_embeddings
    assert (model.llm.lm_head.weight is model.llm.get_input_embeddings().weight) == tied  # as the checkpoint
    torch.testing.assert_close(model.llm.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)
    with torch.no_grad():
        ours = model.image_tokens(pixels())[0][:, :case.projector_tokens]
        theirs = case.image_features(ref, pixels())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # the family's own connector
    from trainer.model.flops import ifas_sample_flops

    assert ifas_sample_flops(model, 64, 4).train > 0  # the benchmark's FLOPs count runs on every family


def test_the_gac_reads_every_vision_layer(family):
    case, directory, _ = family
    model, _ = build(case, directory)
    seen = {}
    model.gac.register_forward_hook(lambda module, args, out: seen.update(states=args[0]))
    with torch.no_grad():
        model.image_tokens(pixels())
        manual = case.layer_outputs(model.vision, pixels())  # one layer at a time, by hand
    assert len(seen["states"]) == len(manual) == LAYERS
    for got, want in zip(seen["states"], manual):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.fixture
def video_slot_may_be_empty(monkeypatch):
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))


@pytest.mark.parametrize("gac", [False, True])
def test_the_prompt_and_pixels_are_the_processors_own(family, gac, video_slot_may_be_empty):
    case, directory, _ = family
    model, tok = build(case, directory, gac=gac)
    processor = checkpoint_processor(case.name, directory)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 50, 3), dtype=np.uint8))
    inputs = processor(text=text, images=[image], return_tensors="pt")
    theirs = inputs["input_ids"][0].tolist()
    image_id = model.arch.image_token_id
    last = len(theirs) - theirs[::-1].index(image_id)
    assert theirs.count(image_id) == case.projector_tokens
    if gac:  # the GAC tokens follow the projector's (inside InternVL's <img>...</img>)
        theirs = theirs[:last] + [image_id] * GAC_TOKENS + theirs[last:]
    builder = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span)
    assert builder.prompt_ids == theirs
    transform = ImageTransform.for_model(model.arch)
    expected = case.family_pixels(transform(image)[None])  # the pixels of training, as the family lays them out
    torch.testing.assert_close(inputs["pixel_values"].reshape(expected.shape), expected, atol=1e-5, rtol=0)


def test_without_gac_the_family_format_export_scores_the_same(family, tmp_path, video_slot_may_be_empty):
    from transformers import AutoModelForImageTextToText

    from trainer.model.families.hf_format import save_family_processor, write_family
    from trainer.sample.tokenizer import processor_chat_template

    case, directory, _ = family
    model, tok = build(case, directory, gac=False)
    save_family_processor(model.config_dict(), tok, processor_chat_template(directory), tmp_path / "processor")
    write_family(model.config_dict(), model.state_dict(), tmp_path / "processor", tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == type(family[2]).__name__
    enc = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).encode_prompt()
    ids = torch.tensor([enc.input_ids] * 2)
    mask = torch.ones_like(ids)
    kw = {}  # what the family's processor gives along with the pixels, for square faces
    if model.family.image_newline:
        kw["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]] * 2)
    if model.projector is None:  # Qwen-VL: the merger is in the vision tower, the grid goes with the pixels
        kw["image_grid_thw"] = torch.tensor([[1, IMAGE_SIZE // 8, IMAGE_SIZE // 8]] * 2)
        kw["mm_token_type_ids"] = (ids == model.arch.image_token_id).int()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, pixel_values=case.family_pixels(pixels()),
                    **kw).logits[:, enc.score_position]
        ours = model(ids, mask, pixels(), torch.tensor([enc.score_position] * 2)).scores
    theirs = torch.softmax(logits[:, [model.arch.yes_token_id, model.arch.no_token_id]], dim=-1)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # explanations: greedy generation gives the family's own tokens and logits (Qwen-VL: positions after the image)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=case.family_pixels(pixels()), **kw,
                             **greedy)
        ours = model.generate(ids, mask, pixels(), **greedy)
    assert ours.sequences.tolist() == theirs.sequences[:, ids.shape[1]:].tolist()
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(theirs.logits), rtol=1e-4, atol=1e-5)

    # the exported processor, on a face larger than any default crop: the same prompt, pixels and score
    processor = checkpoint_processor(case.name, tmp_path / "hf")
    face = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[face], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == enc.input_ids
    transform = ImageTransform.for_model(model.arch)
    with torch.no_grad():
        logits = hf(**inputs).logits[:, -1]
        ours = model(inputs["input_ids"], inputs["attention_mask"], transform(face)[None],
                     torch.tensor([enc.score_position])).scores
    theirs = torch.softmax(logits[:, [model.arch.yes_token_id, model.arch.no_token_id]], dim=-1)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [name for name in FAMILIES if name.startswith("qwen")], indirect=True)
def test_qwen_positions_equal_the_familys_rope_index_in_a_right_padded_batch(family):
    case, directory, ref = family
    model, tok = build(case, directory, gac=False)
    prompt = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).encode(True, "a face")
    short = prompt.input_ids
    long = short + tok.encode(" printed on glossy paper", add_special_tokens=False)
    ids = torch.full((2, len(long)), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate((short, long)):  # padded on the right, as the collate pads
        ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
    rows = IMAGE_SIZE // 8
    theirs, _ = ref.model.get_rope_index(ids, (ids == model.arch.image_token_id).int(),
                                         image_grid_thw=torch.tensor([[1, rows, rows]] * 2), attention_mask=mask)
    ours = model.family.positions(model, ids, mask)
    assert torch.equal(ours[:, mask.bool()], theirs[:, mask.bool()])


def test_check_refuses_an_unsupported_family_within_seconds(small_shards, tmp_path):
    from transformers import Idefics3Config

    Idefics3Config().save_pretrained(tmp_path / "smolvlm")  # a config alone: nothing may be loaded
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "trainer.cli.train", "--check", f"model.path={tmp_path / 'smolvlm'}",
                           f"data.train_shards=[{small_shards['domain_a']}]"], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("ifas-train: error:")]
    assert len(error) == 1 and "model_type 'idefics3' is not a supported checkpoint family" in error[0]
    for name in FAMILIES:
        assert f"{name} (model_type {name}" in error[0]
    assert elapsed < 10, elapsed


# One family per adapter path, to keep the suite's time: LLaVA-NeXT runs OneVision's anyres code, Qwen2-VL
# the M-RoPE model Qwen2.5-VL (window attention) and Qwen3-VL (deepstack) add to; LLaVA's run of this is
# tests/trainer/training/test_fused_loss_zero3.py, with test_train_e2e.py's export scores.
TRAINED_ON_TWO_RANKS = ("llava_onevision", "internvl", "qwen2_5_vl", "qwen3_vl")


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", TRAINED_ON_TWO_RANKS, indirect=True)
def test_trains_with_gac_on_two_zero3_ranks_and_the_export_scores_as_the_engine(family, small_shards, tmp_path):
    from tests.helpers import train_history
    from tests.trainer.training.test_train_e2e import run_train
    from trainer.model.export import export_run

    case, directory, _ = family
    out = tmp_path / "run"
    # model.projector_merge=1 (unset): launch/train.sh's default demo config merges 2 x 2 patches
    run_train(small_shards, out, f"model.path={directory}", "model.projector_merge=1", "train.max_steps=2",
              "optim.lr=1e-3", "eval.dev_shards=[]",  # no dev set: the held-out scores are compared
              *(f"model.{key}={value}" for key, value in case.model_kw.items()))
    assert sorted(train_history(out)) == [1, 2]
    assert_export_scores_equal_the_runs(export_run(out), out, small_shards["domain_d"])


def test_the_readme_table_is_what_the_code_prints():
    from trainer.bench.tables import families_table

    assert families_table() in (ROOT / "README.md").read_text()


def test_the_normalisation_is_read_where_transformers_5_keeps_it_and_never_guessed(tmp_path, demo_tokenizer):
    """A checkpoint saved by transformers 5 keeps its image processor inside processor_config.json (no
    preprocessor_config.json); one with neither is refused, its normalisation cannot be guessed."""
    from transformers import AutoProcessor

    from trainer.model.arch import ModelLoadError

    FAMILY_CASES["llava"].save(tmp_path, demo_tokenizer)
    processor = AutoProcessor.from_pretrained(tmp_path)
    processor.image_processor.image_mean = processor.image_processor.image_std = [0.5, 0.5, 0.5]
    (tmp_path / "preprocessor_config.json").unlink(missing_ok=True)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    model, _ = build(FAMILY_CASES["llava"], tmp_path)
    assert model.arch.image_mean == model.arch.image_std == [0.5, 0.5, 0.5]
    face = Image.fromarray(np.random.default_rng(2).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    torch.testing.assert_close(ImageTransform.for_model(model.arch)(face)[None],
                               processor(text="<image>", images=[face], return_tensors="pt")["pixel_values"],
                               rtol=0, atol=1e-6)
    (tmp_path / "processor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="has no image processor"):
        build(FAMILY_CASES["llava"], tmp_path)


@pytest.mark.torchvision
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="needs torchvision (make test-torchvision runs it in its own venv)")
def test_with_torchvision_every_family_export_loads_with_autoprocessor_and_prompts_as_training(family, tmp_path):
    """Where torchvision is installed transformers builds each family's processor whole (the video processors of
    InternVL, OneVision and Qwen-VL need it): the export writes it so, AutoProcessor loads it, and its prompt and
    PIL pixels (faces of several sizes) are training's."""
    from transformers import AutoImageProcessor, AutoProcessor

    from trainer.model.families.hf_format import save_family_processor, write_family
    from trainer.sample.tokenizer import processor_chat_template

    case, directory, _ = family
    model, tok = build(case, directory, gac=False)
    save_family_processor(model.config_dict(), tok, processor_chat_template(directory), tmp_path / "processor")
    write_family(model.config_dict(), model.state_dict(), tmp_path / "processor", tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    video = "video_processor" in processor.get_attributes()
    assert not video or processor.video_processor is not None  # whole
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    enc = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).encode_prompt()
    pil = AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    for side in (40, IMAGE_SIZE, 300):
        face = Image.fromarray(np.random.default_rng(side).integers(0, 255, (side, side, 3), dtype=np.uint8))
        assert processor(text=text, images=[face], return_tensors="pt")["input_ids"][0].tolist() == enc.input_ids
        expected = case.family_pixels(ImageTransform.for_model(model.arch)(face)[None])
        theirs = pil(images=[face], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(theirs.reshape(expected.shape), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl"])
def test_exported_image_processors_give_every_square_face_the_training_grid(name, demo_tokenizer, tmp_path):
    """At release sizes (CLIP-L/336 tiles; Qwen's 448 on a 28-pixel unit), over face sizes from small to large:
    LLaVA-NeXT's processor gives the whole image plus one tile, Qwen's a 32 x 32 patch grid."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.trainer.model.family_checkpoints import family_tokenizer
    from trainer.model.families.hf_format import save_family_processor

    size = 336 if name == "llava_next" else 448
    arch = {"family": name, "image_size": size, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "has_class_token": name == "llava_next", "image_token_id": 0}
    vision = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2}
    tok = family_tokenizer(demo_tokenizer, image_token="<image>" if name == "llava_next" else "<|image_pad|>")
    save_family_processor({"arch": arch, "vision_config": vision}, tok, None, tmp_path)
    cls = LlavaNextImageProcessorPil if name == "llava_next" else Qwen2VLImageProcessorPil
    images = cls.from_pretrained(tmp_path)
    for side in range(120, 1000, 37):
        out = images(Image.new("RGB", (side, side)), return_tensors="pt")
        if name == "llava_next":
            assert tuple(out["pixel_values"].shape) == (1, 2, 3, size, size), side
        else:
            assert out["image_grid_thw"].tolist() == [[1, size // 14, size // 14]], side
