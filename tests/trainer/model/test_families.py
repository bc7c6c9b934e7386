"""Checkpoint families (trainer/model/families.py), with tiny checkpoints saved here by transformers' own
classes: an InternVL checkpoint's image tokens are its own connector's, the GAC reads every vision layer,
the prompt is its processor's own, a model without GAC exported in the family's format loads with
AutoModelForImageTextToText and scores the same, 2 ZeRO-3 ranks train it with GAC and its export scores
as the engine did; an unsupported model type is refused by --check within seconds."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from shards.schema import QUESTION
from tests.helpers import ROOT, assert_export_scores_equal_the_runs, launch_env
from tests.trainer.model.internvl_checkpoint import IMAGE_SIZE, INTERNVL_TEMPLATE, LAYERS, PROJECTOR_TOKENS, save_internvl
from tests.trainer.model.test_ifas import assert_same_weights
from trainer.config import ModelConfig
from trainer.data import ImageTransform
from trainer.model.build import build_model
from trainer.model.prompt import PromptBuilder


@pytest.fixture(scope="module")
def internvl(tmp_path_factory, demo_tokenizer):
    directory = tmp_path_factory.mktemp("internvl")
    return directory, save_internvl(directory, demo_tokenizer).eval()


def pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))


def test_internvl_weights_and_image_tokens_are_the_checkpoints_own(internvl):
    directory, ref = internvl
    model, _ = build_model(ModelConfig(path=str(directory)))
    model.eval()
    assert model.arch.family == "internvl" and model.arch.projector_merge == 2
    assert (model.num_patch_tokens, model.num_image_tokens) == (PROJECTOR_TOKENS, PROJECTOR_TOKENS + 4 + LAYERS)
    assert_same_weights(model.vision, ref.model.vision_tower)
    assert_same_weights(model.projector, ref.model.multi_modal_projector)
    assert_same_weights(model.llm.model, ref.model.language_model)
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight  # tied, as the checkpoint
    with torch.no_grad():
        ours = model.encode_images(pixels())[:, :PROJECTOR_TOKENS]
        theirs = ref.model.get_image_features(pixel_values=pixels(), vision_feature_layer=-1,
                                              vision_feature_select_strategy="default").pooler_output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # the pixel shuffle + projector of InternVL


def test_the_gac_reads_every_vision_layer(internvl):
    directory, _ = internvl
    model, _ = build_model(ModelConfig(path=str(directory)))
    model.eval()
    seen = {}
    model.gac.register_forward_hook(lambda module, args, out: seen.update(states=args[0]))
    with torch.no_grad():
        model.encode_images(pixels())
        h = model.vision.embeddings(pixels())
        manual = []
        for layer in model.vision.encoder.layer:  # one layer at a time, by hand
            h = layer(h)
            manual.append(h)
    assert len(seen["states"]) == LAYERS
    for got, want in zip(seen["states"], manual):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def internvl_processor(directory, tokenizer, monkeypatch):
    """The checkpoint's InternVLProcessor, run by transformers' own code; its video slot is left empty
    (transformers builds the video processor with torchvision, which this machine's CPU torch cannot have)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    return InternVLProcessor(image_processor=GotOcr2ImageProcessorPil.from_pretrained(directory), tokenizer=tokenizer,
                             video_processor=None, image_seq_length=PROJECTOR_TOKENS,
                             chat_template=(directory / "chat_template.jinja").read_text())


@pytest.mark.parametrize("gac", [False, True])
def test_the_prompt_and_pixels_are_the_internvl_processors_own(internvl, gac, monkeypatch):
    directory, _ = internvl
    model, tok = build_model(ModelConfig(path=str(directory), gac=gac))
    processor = internvl_processor(directory, tok, monkeypatch)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    inputs = processor(text=text, images=[image], return_tensors="pt")
    theirs = inputs["input_ids"][0].tolist()
    if gac:  # the GAC tokens follow the projector's inside <img>...</img>
        end = theirs.index(tok.end_image_token_id)
        theirs = theirs[:end] + [tok.context_image_token_id] * (model.num_image_tokens - PROJECTOR_TOKENS) + theirs[end:]
    builder = PromptBuilder(tok, model.num_image_tokens, 512, image_span=model.arch.image_span)
    assert builder.prompt_ids == theirs
    transform = ImageTransform(model.arch.image_size, model.arch.image_mean, model.arch.image_std)
    torch.testing.assert_close(inputs["pixel_values"][0], transform(image), atol=1e-5, rtol=0)  # as in training


def test_internvl_without_gac_exports_as_internvl_and_scores_the_same(internvl, tmp_path):
    from transformers import AutoModelForImageTextToText

    from trainer.model.families import save_family_processor, write_family

    directory, _ = internvl
    model, tok = build_model(ModelConfig(path=str(directory), gac=False))
    model.eval()
    save_family_processor(model.config_dict(), tok, INTERNVL_TEMPLATE, tmp_path / "processor")
    write_family(model.config_dict(), model.state_dict(), tmp_path / "processor", tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "InternVLForConditionalGeneration"
    enc = PromptBuilder(tok, model.num_image_tokens, 512, image_span=model.arch.image_span).encode_prompt()
    ids = torch.tensor([enc.input_ids] * 2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits[:, enc.score_position]
        ours = model(ids, mask, pixels(), torch.tensor([enc.score_position] * 2)).scores
    theirs = torch.softmax(logits[:, [model.arch.yes_token_id, model.arch.no_token_id]], dim=-1)[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


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
    assert "llava (model_type llava" in error[0] and "internvl (model_type internvl" in error[0]
    assert elapsed < 10, elapsed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_internvl_trains_with_gac_on_two_zero3_ranks_and_its_export_scores_as_the_engine(internvl, small_shards,
                                                                                         tmp_path):
    from tests.helpers import train_history
    from tests.trainer.training.test_train_e2e import run_train
    from trainer.model.export import export_run

    directory, _ = internvl
    out = tmp_path / "run"
    run_train(small_shards, out, f"model.path={directory}", "train.max_steps=2", "optim.lr=1e-3")
    assert sorted(train_history(out)) == [1, 2]
    assert_export_scores_equal_the_runs(export_run(out), out, small_shards["domain_d"])
