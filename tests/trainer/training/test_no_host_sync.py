"""No host-device sync in the training micro-step (forward, loss, backward) in the project's own code, the
normalisation of the loader's uint8 pixels included.

A ``TorchDispatchMode`` sees every aten op of one micro-step of the tiny model (unfused and fused loss) and of
one checkpoint family per adapter path (CLIP-style LLaVA, LLaVA-OneVision's anyres, InternVL, Qwen-VL's M-RoPE;
fused loss). The ops that make the host wait for the device (a scalar read, ``nonzero``, a boolean-mask gather, a
tensor built from Python data, which is a host-to-device copy on a GPU) are attributed to the innermost project
or transformers frame on the Python stack at the time; the project's count must be 0 (docs/architecture.md, "No
host syncs in the step")."""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import ROOT
from tests.trainer.model.family_checkpoints import FAMILY_CASES
from trainer.config import ModelConfig
from trainer.data import collate
from trainer.model.build import build_model
from trainer.sample.prompt import PromptBuilder
from trainer.training.loop import model_inputs

# ops that read device data on the host (or, for lift_fresh, put host data on the device)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "lift_fresh", "item", "unique",
            "_unique2", "repeat_interleave"}
# transformers' own, per function: the sdpa mask's "is the padding all ones" check (padding_mask.all()), and
# Qwen-VL's vision tower reading its grid_thw (cu_seqlens by repeat_interleave, rotary positions from a list)
TRANSFORMERS_SYNCS = {"_ignore_causal_mask_sdpa", "get_vision_cu_seqlens", "get_vision_position_ids"}
PROJECT = tuple(str(ROOT / d) for d in ("trainer", "kernels"))


def _owner() -> str:
    """Who issued the op: the innermost project or transformers frame (autograd's own backward nodes, which
    have no Python frame of their own, count as the step's, i.e. the project's)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(PROJECT):
            return f"project {Path(frame.filename).relative_to(ROOT)}:{frame.lineno} {frame.name}"
        if "/transformers/" in frame.filename:
            return f"transformers {frame.filename.split('/transformers/')[1]}:{frame.lineno} {frame.name}"
    return "project (autograd)"


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        data_dependent = name in SYNC_OPS or (
            name in ("index", "index_put", "index_put_")
            and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()) if i is not None))
        if data_dependent:
            self.seen[(name, _owner())] += 1
        return func(*args, **(kwargs or {}))

    def by(self, who: str) -> dict:
        return {k: v for k, v in self.seen.items() if k[1].startswith(who)}


def assert_only_known_transformers_syncs(counter: SyncCounter) -> None:
    """transformers' own syncs, listed in docs/architecture.md; a new one shows up here."""
    functions = {owner.rsplit(" ", 1)[1] for _, owner in counter.by("transformers")}
    assert functions <= TRANSFORMERS_SYNCS, counter.by("transformers")


def _batch(model, tok, n: int = 2) -> dict:
    builder = PromptBuilder(tok, model.num_image_tokens, 4096, image_span=model.arch.image_span)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        enc = builder.encode(i % 2 == 0, "screen moire and glare" * (1 + i))
        samples.append({"input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
                        "score_position": enc.score_position, "image_positions": enc.image_positions,
                        "pixel_values": torch.randint(0, 256, (3, model.arch.image_size, model.arch.image_size),
                                                      generator=g, dtype=torch.uint8),  # as the loader's
                        "live": i % 2, "key": f"k{i}", "meta": {}})
    return collate(samples, tok.pad_token_id)


def micro_step_syncs(model, tok, fused: bool) -> SyncCounter:
    model.train()
    model.use_kernels(fused)
    inputs = model_inputs(_batch(model, tok), torch.device("cpu"))  # the loader's side: outside the step
    counts = torch.tensor([2.0, 30.0], dtype=torch.float64)  # all-reduced on the device by train_step
    counter = SyncCounter()
    with counter:
        out = model(**inputs, alpha=0.7, n_judgment=counts[0], n_interpretation=counts[1])
        out.loss.total.backward()
    return counter


@pytest.fixture(scope="module")
def tiny(demo_tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), demo_tokenizer)


@pytest.mark.parametrize("fused", [False, True])
def test_tiny_model_micro_step_has_no_host_sync(tiny, fused):
    counter = micro_step_syncs(*tiny, fused)
    assert counter.by("project") == {}
    assert_only_known_transformers_syncs(counter)


@pytest.mark.parametrize("name", ["llava", "llava_onevision", "internvl", "qwen2_vl"])
def test_family_micro_step_has_no_host_sync_in_project_code(name, demo_tokenizer, tmp_path):
    case = FAMILY_CASES[name]
    case.save(tmp_path, demo_tokenizer)
    model, tok = build_model(ModelConfig(path=str(tmp_path), **case.model_kw))
    counter = micro_step_syncs(model, tok, fused=True)
    assert counter.by("project") == {}, counter.seen
    assert_only_known_transformers_syncs(counter)


def test_the_collates_positions_are_what_the_model_would_find(tiny):
    """The image positions and supervised rows the collate carries equal those the model finds itself (with a
    sync), and the step gives the same loss and gradients with either."""
    from trainer.sample.positions import image_token_positions

    model, tok = tiny
    model.use_kernels(False)
    batch = _batch(model, tok, 3)
    assert torch.equal(batch["image_positions"], image_token_positions(batch["input_ids"], model.arch.image_token_id))
    targets = batch["labels"][:, 1:]
    assert batch["supervised_rows"].numel() == int((targets != -100).sum()) > 0

    def step(inputs):
        model.zero_grad()
        out = model(**inputs, alpha=0.7, n_judgment=3.0, n_interpretation=40.0)
        out.loss.total.backward()
        return out.loss.total.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    given = model_inputs(batch, torch.device("cpu"))
    found = {k: v for k, v in given.items() if k not in ("image_positions", "supervised_rows")}
    loss_given, grad_given = step(given)
    loss_found, grad_found = step(found)
    assert torch.equal(loss_given, loss_found) and torch.equal(grad_given, grad_found)


def test_uint8_pixels_normalised_in_the_model_are_the_transforms_floats(tiny):
    """The loader carries uint8 (a quarter of fp32's bytes); the model's normalisation gives exactly the floats
    the transform gives (and takes those too)."""
    from PIL import Image

    from trainer.data import ImageTransform

    model, tok = tiny
    model.eval()
    transform = ImageTransform.for_model(model.arch)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 256, (40, 50, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(2)]
    batch = _batch(model, tok)
    uint8 = torch.stack([transform.pixels(im) for im in images])
    assert uint8.dtype == torch.uint8 and uint8.nbytes * 4 == torch.stack([transform(im) for im in images]).nbytes
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "score_positions", "image_positions")}
        from_uint8 = model(**inputs, pixel_values=uint8).scores
        from_floats = model(**inputs, pixel_values=torch.stack([transform(im) for im in images])).scores
    assert torch.equal(from_uint8, from_floats)
    # the TensorBoard examples show either as the same picture
    from trainer.eval.explain import to_uint8_image

    shown = to_uint8_image(uint8[0], model.arch.image_mean, model.arch.image_std)
    assert (shown == uint8[0].permute(1, 2, 0).numpy()).all()
    undone = to_uint8_image(transform(images[0]), model.arch.image_mean, model.arch.image_std)
    assert abs(undone.astype(int) - shown.astype(int)).max() <= 1
