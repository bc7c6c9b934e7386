"""The README's tables, computed by the code the trainer runs (``python -m trainer.bench.tables`` prints them; the
tests check the README holds exactly this output): the checkpoint families with their image tokens per face, and
the per-rank memory of 7B full fine-tunes under ZeRO-3."""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
from typing import Any

from trainer.config import PROJECT_ROOT
from trainer.model.families import FAMILIES
from trainer.training.memory import (
    GiB,
    ModelSize,
    StateDtypes,
    build_peak_bytes,
    ifas_size,
    legacy_build_bytes,
    model_state_bytes,
)


def families_table(gac_prefix_queries: int = 4) -> str:
    """The checkpoint families: the image tokens per face at each release's own resolution (projector tokens,
    then with the GAC), counted by the code the model is built with."""
    rows = ["| family (`model_type`) | releases | vision tower | image tokens per face: projector + GAC |",
            "|---|---|---|---|"]
    for family in FAMILIES:
        for r in family.releases:
            vision = SimpleNamespace(image_size=r.image_size, patch_size=r.patch_size, num_hidden_layers=r.layers)
            patches, total = family.image_token_counts(vision, r.merge, True, gac_prefix_queries)
            rows.append(f"| {family.name} | {r.name} | {r.vision}, {r.layers} layers | "
                        f"{patches} + {total - patches} = {total} |")
    return "\n".join(rows)


def checkpoint_configs() -> dict[str, tuple[Any, Any]]:
    """Vision and text configs of the 7-8B checkpoints the README gives figures for (the shapes in
    their config.json files)."""
    from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config

    clip_l_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    vicuna_7b = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                            num_attention_heads=32, num_key_value_heads=32)
    qwen2_7b = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    return {"llava-1.5-7b-hf": (clip_l_336, vicuna_7b), "CLIP-L/336 + Qwen2-7B-Instruct": (clip_l_336, qwen2_7b)}


def real_run_dtypes() -> StateDtypes:
    """What the real-run configs hold: bf16 training on the shipped 7B DeepSpeed config."""
    ds = json.loads((PROJECT_ROOT / "launch" / "ds_zero3_7b.json").read_text())
    return StateDtypes.of_deepspeed_config({**ds, "bf16": {"enabled": True}})


def real_checkpoints() -> list[ModelSize]:
    return [ifas_size(name, *configs) for name, configs in checkpoint_configs().items()]


def memory_table(world_sizes: tuple[int, ...] = (8, 16, 32)) -> str:
    """The README's table: per-rank memory of a 7B full fine-tune under ZeRO-3 in bf16."""
    rows = ["| I-FAS on | parameters | GPUs | model states / GPU | loading, extra / rank | "
            "loading before the partitioned build / rank (8-GPU node) |", "|---|---|---|---|---|---|"]
    dtypes = real_run_dtypes()
    for size in real_checkpoints():
        for ws in world_sizes:
            states = model_state_bytes(size.parameters, ws, dtypes)
            build = build_peak_bytes(size.largest_tensor, "bf16")
            legacy = legacy_build_bytes(size.parameters)
            rows.append(f"| {size.name} | {size.parameters / 1e9:.2f}B | {ws} | {states / GiB:.1f} GiB | "
                        f"{build / GiB:.1f} GiB | {legacy / GiB:.0f} GiB ({8 * legacy / GiB:.0f} GiB) |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="trainer.bench.tables", description=__doc__.splitlines()[0]).parse_args(argv)
    print(families_table(), memory_table(), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
