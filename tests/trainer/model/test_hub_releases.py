"""Real releases as the Hub ships them: each release's own small files (config.json as published, tokenizer,
processor and template files; ``IFAS_HUB`` names the folder, ../shared/hub by default, and the tests skip saying
so where it is absent) with tiny random weights written under the release's own key names by
trainer.model.tiny_release. From those files alone ``--check`` passes with only the paths set, the model builds
with the release's tokenizer (its image token named as its processor names it), tying as transformers ties it,
the weights its files hold, the prompt ids and pixels its processor gives (assembled by transformers from the
release's files), and the family-format export of a model without GAC scores as the model does.

Qwen2-VL-2B's folder has no config.json (none authentic was found: its SOURCES.md): the one here is written from
the values SOURCES.md lists for the release, in its flat layout. The 3B and 2B folders take vocab.json and
merges.txt from the 7B folder (the same blobs, SOURCES.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shards.schema import QUESTION
from tests.helpers import ROOT, launch_env
from trainer.config import ModelConfig
from trainer.data import ImageTransform
from trainer.model.build import build_model
from trainer.sample.prompt import PromptBuilder

HUB = Path(os.environ.get("IFAS_HUB", ROOT.parent / "shared" / "hub"))
QWEN_7B = "Qwen__Qwen2.5-VL-7B-Instruct"
QWEN2_VL_2B_CONFIG = {  # SOURCES.md's values of the release's config.json (flat transformers-4 layout)
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 32768, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936}
# folder -> files it lacks, taken from another folder (or written here)
RELEASES = {
    QWEN_7B: {},
    "Qwen__Qwen2.5-VL-3B-Instruct": {"vocab.json": QWEN_7B, "merges.txt": QWEN_7B},
    "Qwen__Qwen2-VL-2B-Instruct": {"merges.txt": QWEN_7B, "config.json": QWEN2_VL_2B_CONFIG},
    "Qwen__Qwen3-VL-4B-Instruct": {},
    "Qwen__Qwen3-VL-8B-Instruct": {},
    "llava-hf__llava-1.5-7b-hf": {},
}
pytestmark = pytest.mark.skipif(not HUB.is_dir(), reason=f"the releases' files are not at {HUB} (set IFAS_HUB)")
needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="needs torchvision (make test-torchvision runs it in its own venv)")
FACE_SIDES = (120, 300, 700)  # faces the processor resizes to the training size


@pytest.fixture(scope="module", params=sorted(RELEASES))
def release(request, tmp_path_factory) -> tuple[str, Path]:
    """(name, a tiny checkpoint of the release: its own files, tiny random weights)."""
    from trainer.model.tiny_release import make_tiny_release

    name = request.param
    files = tmp_path_factory.mktemp("files") / name
    shutil.copytree(HUB / name, files)
    for file, source in RELEASES[name].items():
        if isinstance(source, dict):
            (files / file).write_text(json.dumps(source, indent=2))
        else:
            shutil.copyfile(HUB / source / file, files / file)
    return name, make_tiny_release(files, tmp_path_factory.mktemp("tiny") / name)


def release_processor(directory: Path, video_slot_may_be_empty):
    """The release's processor, assembled by transformers from its own files: AutoProcessor where it needs no
    torchvision, else its processor class from the same parts without the video processor (torchvision does not
    import beside this machine's CPU torch)."""
    import importlib.util

    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    settings = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (directory / name).is_file():
            settings = {**json.loads((directory / name).read_text()), **settings}
    cls = getattr(transformers, settings["processor_class"])
    if "video_processor" not in cls.get_attributes() or importlib.util.find_spec("torchvision"):
        return AutoProcessor.from_pretrained(directory)
    from trainer.sample.tokenizer import processor_chat_template

    return cls(image_processor=AutoImageProcessor.from_pretrained(directory, backend="pil"),
               tokenizer=AutoTokenizer.from_pretrained(directory), chat_template=processor_chat_template(directory))


@pytest.fixture
def video_slot_may_be_empty(monkeypatch):
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))


def test_the_check_passes_with_only_model_and_data_paths(release, small_shards):
    from trainer.config import load_config
    from trainer.training.inputs import check_inputs, check_model_files, check_sequence_budget, prepare_tokenizer

    _, directory = release
    cfg = load_config(ROOT / "launch" / "configs" / "checkpoint.yaml",
                      [f"model.path={directory}", f"data.train_shards=[{small_shards['domain_a']}]"])
    urls, _ = check_inputs(cfg)
    tokenizer = prepare_tokenizer(cfg, urls)
    check_model_files(cfg, tokenizer)
    assert check_sequence_budget(cfg, tokenizer) == cfg.data.answer_tokens - 2 and cfg.data.max_length > 0


def test_the_model_is_the_releases_own_and_prompts_and_sees_as_its_processor(release, video_slot_may_be_empty):
    from safetensors import safe_open
    from transformers import AutoConfig

    name, directory = release
    model, tok = build_model(ModelConfig(path=str(directory)))
    model.eval()
    config = AutoConfig.from_pretrained(directory)
    raw = json.loads((directory / "config.json").read_text())
    # tied as transformers ties the checkpoint: the flat configs keep tie_word_embeddings at the top level
    tied = raw.get("tie_word_embeddings", raw.get("text_config", {}).get("tie_word_embeddings", False))
    assert (model.llm.lm_head.weight is model.llm.get_input_embeddings().weight) == bool(tied)
    assert model.arch.image_token_id == getattr(config, "image_token_id", getattr(config, "image_token_index", None))
    # the weights the release's files hold, under its own key names (older layouts translated)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = next(k for k in keys if k.endswith("embed_tokens.weight"))
        torch.testing.assert_close(model.llm.get_input_embeddings().weight, f.get_tensor(embed).float(), rtol=0, atol=0)
    processor = release_processor(directory, video_slot_may_be_empty)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    size = model.arch.image_size
    face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    inputs = processor(text=text, images=[face], return_tensors="pt")
    theirs = inputs["input_ids"][0].tolist()
    image_id = model.arch.image_token_id
    assert theirs.count(image_id) == model.num_patch_tokens
    last = len(theirs) - theirs[::-1].index(image_id)  # the GAC tokens follow the projector's
    theirs = theirs[:last] + [image_id] * (model.num_image_tokens - model.num_patch_tokens) + theirs[last:]
    assert PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).prompt_ids == theirs
    ours = ImageTransform.for_model(model.arch)(face)[None]
    if model.projector is None:  # Qwen-VL: flattened patches, as its processor lays them out
        from trainer.model.families.mrope import patchify

        vc = model.vision.config
        ours = patchify(ours, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)[0]
    torch.testing.assert_close(inputs["pixel_values"].reshape(ours.shape), ours, rtol=0, atol=1e-6)


def test_without_gac_the_family_format_export_loads_and_scores_the_same(release, tmp_path, video_slot_may_be_empty):
    from transformers import AutoModelForImageTextToText

    from trainer.model.families.hf_format import save_family_processor, write_family
    from trainer.sample.tokenizer import processor_chat_template

    _, directory = release
    model, tok = build_model(ModelConfig(path=str(directory), gac=False))
    model.eval()
    save_family_processor(model.config_dict(), tok, processor_chat_template(directory), tmp_path / "processor")
    write_family(model.config_dict(), model.state_dict(), tmp_path / "processor", tmp_path / "hf")
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()  # what readers of the release layout need
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    processor = release_processor(tmp_path / "hf", video_slot_may_be_empty)
    face = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[face], return_tensors="pt")
    enc = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).encode_prompt()
    assert inputs["input_ids"][0].tolist() == enc.input_ids
    with torch.no_grad():
        logits = hf(**inputs).logits[:, -1]
        ours = model(inputs["input_ids"], inputs["attention_mask"], ImageTransform.for_model(model.arch)(face)[None],
                     torch.tensor([enc.score_position])).scores
    theirs = torch.softmax(logits[:, [model.arch.yes_token_id, model.arch.no_token_id]], dim=-1)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("release", [QWEN_7B, "llava-hf__llava-1.5-7b-hf", "Qwen__Qwen3-VL-4B-Instruct"],
                         indirect=True)
def test_two_zero3_ranks_train_the_release_with_gac(release, small_shards, tmp_path):
    from tests.helpers import train_history
    from tests.trainer.training.test_train_e2e import run_train

    _, directory = release
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer.cli.train", "--check", "--config",
                           "launch/configs/checkpoint.yaml", f"model.path={directory}",
                           f"data.train_shards=[{small_shards['domain_a']}]"],
                          cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_train(small_shards, out, "--config", "launch/configs/checkpoint.yaml", f"model.path={directory}",
              "train.max_steps=2", "train.deepspeed_config=launch/ds_zero3.json", "model.gradient_checkpointing=[]",
              "eval.dev_shards=[]", "eval.at_end=false")
    assert sorted(train_history(out)) == [1, 2]


def face_of(side: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))


def training_pixels(model, face: Image.Image) -> torch.Tensor:
    """The pixels training computes, laid out as the family's processor lays them out."""
    ours = ImageTransform.for_model(model.arch)(face)[None]
    if model.projector is None:  # Qwen-VL: flattened patches
        from trainer.model.families.mrope import patchify

        vc = model.vision.config
        ours = patchify(ours, vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)[0]
    return ours


@pytest.mark.torchvision
@needs_torchvision
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_the_releases_own_autoprocessor_prompts_and_sees_as_training(release, backend):
    """AutoProcessor builds the release's processor whole (its video processor needs torchvision), with the
    torchvision ("fast") image processor by default: at the training size its pixels are training's."""
    from transformers import AutoImageProcessor, AutoProcessor

    _, directory = release
    model, tok = build_model(ModelConfig(path=str(directory)))
    processor = AutoProcessor.from_pretrained(directory)
    if backend == "pil":  # (AutoProcessor's backend="pil" refuses the video processor, which has no PIL backend)
        processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    face = face_of(model.arch.image_size)
    inputs = processor(text=text, images=[face], return_tensors="pt")
    theirs = inputs["input_ids"][0].tolist()
    last = len(theirs) - theirs[::-1].index(model.arch.image_token_id)
    theirs = theirs[:last] + [model.arch.image_token_id] * (model.num_image_tokens - model.num_patch_tokens) + \
        theirs[last:]
    assert PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).prompt_ids == theirs
    ours = training_pixels(model, face)
    torch.testing.assert_close(inputs["pixel_values"].reshape(ours.shape), ours, rtol=0, atol=1e-6)


@pytest.mark.torchvision
@needs_torchvision
def test_the_export_with_torchvision_loads_whole_and_gives_the_training_pixels(release, tmp_path):
    """Where torchvision is installed the family-format export writes the processor whole (video processor
    included); AutoProcessor loads it and the model scores as ours. Its PIL image processor gives training's
    pixels for every face size; the torchvision one gives the same grid, and training's pixels at the training
    size (other sizes: torchvision's bicubic resampling differs from PIL's by up to about 0.03 after
    normalisation, README "Export, evaluation and prediction")."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

    from trainer.model.families.hf_format import save_family_processor, write_family
    from trainer.sample.tokenizer import processor_chat_template

    _, directory = release
    model, tok = build_model(ModelConfig(path=str(directory), gac=False))
    model.eval()
    save_family_processor(model.config_dict(), tok, processor_chat_template(directory), tmp_path / "processor")
    write_family(model.config_dict(), model.state_dict(), tmp_path / "processor", tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    pil = AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    for side in (*FACE_SIDES, model.arch.image_size):
        face = face_of(side, seed=side)
        ours = training_pixels(model, face)
        theirs = pil(images=[face], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(theirs.reshape(ours.shape), ours, rtol=0, atol=1e-6)
        fast = processor.image_processor(images=[face], return_tensors="pt")["pixel_values"]
        assert fast.numel() == ours.numel()  # the training grid
        assert float((fast.reshape(ours.shape) - ours).abs().max()) <= (1e-6 if side == model.arch.image_size else 0.05)
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    face = face_of(model.arch.image_size, seed=3)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, images=[face], return_tensors="pt")
    enc = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span).encode_prompt()
    assert inputs["input_ids"][0].tolist() == enc.input_ids
    with torch.no_grad():
        logits = hf(**inputs).logits[:, -1]
        ours = model(inputs["input_ids"], inputs["attention_mask"], ImageTransform.for_model(model.arch)(face)[None],
                     torch.tensor([enc.score_position])).scores
    theirs = torch.softmax(logits[:, [model.arch.yes_token_id, model.arch.no_token_id]], dim=-1)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
