"""A release's checkpoint directory with tiny random weights and everything else kept: ``python -m
trainer.model.tiny_release SRC DST`` (tests build the fixtures of docs/architecture.md "Checkpoint families" with
it from the releases' own small files).

Kept byte for byte: every file of SRC but config.json and the weights (tokenizer, processor and template files,
generation config). config.json keeps its layout (a flat transformers-4 file stays flat, key order and unknown
keys included) and its token ids and vocabulary; only the sizes shrink (widths, depths, heads, the rotary
sections). The weights are random, saved under the key names the release's own files use: the family class's
names, or for a release saved before transformers 4.52 (its config's ``transformers_version``) the older names
(``Family.legacy_prefixes``), which the loader must translate.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
LEGACY_BEFORE = (4, 52)  # transformers moved the image-text models' LLM under model.language_model in 4.52
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
TEXT_IF_PRESENT = {"head_dim": 16, "max_window_layers": 2}  # (absent: the class derives them)
VISION = {"hidden_size": 32, "embed_dim": 32, "intermediate_size": 64, "num_hidden_layers": 2, "depth": 2,
          "num_attention_heads": 2, "num_heads": 2, "projection_dim": 32}


def _shrink_rope(section: dict[str, Any]) -> None:
    """M-RoPE sections sum to half the head dim: scaled down to the tiny one, proportions kept."""
    sizes = section.get("mrope_section")
    if sizes:
        half, total = TEXT["hidden_size"] // TEXT["num_attention_heads"] // 2, sum(sizes)
        scaled = [max(1, round(s * half / total)) for s in sizes]
        scaled[0] += half - sum(scaled)
        section["mrope_section"] = scaled


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """The release's config.json with tiny sizes, in its own layout (flat or nested)."""
    out = json.loads(json.dumps(config))
    text = out.get("text_config") if isinstance(out.get("text_config"), dict) else out  # flat: text keys on top
    text.update(TEXT)  # set even where absent: the class defaults are a 7B model's (llava-hf's text_config)
    text.update({key: value for key, value in TEXT_IF_PRESENT.items() if key in text})
    for rope in (text.get("rope_scaling"), text.get("rope_parameters")):
        if isinstance(rope, dict):
            _shrink_rope(rope)
    vision = out.get("vision_config", {})
    for key, value in VISION.items():
        if key in vision:
            vision[key] = value
    if "out_hidden_size" in vision:  # Qwen-VL's merger outputs the LLM's width
        vision["out_hidden_size"] = text["hidden_size"]
    if vision.get("model_type") == "qwen2_vl" or ("embed_dim" in vision and "hidden_size" in vision):
        vision["hidden_size"] = text["hidden_size"]  # Qwen2-VL: hidden_size is the merger's output width
    depth = vision.get("depth", vision.get("num_hidden_layers", 2))
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [depth - 1]
    if "deepstack_visual_indexes" in vision:
        vision["deepstack_visual_indexes"] = [0]
    return out


def _legacy(config: dict[str, Any]) -> bool:
    version = str(config.get("transformers_version", "99"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return parts < LEGACY_BEFORE


def make_tiny_release(src: Path, dst: Path, seed: int = 0) -> Path:
    """Write ``src``'s release with tiny random weights to ``dst`` (see the module's docstring)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from trainer.model.families import checkpoint_family

    family = checkpoint_family(src)
    config = json.loads((src / "config.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in WEIGHT_FILES and f.name != "config.json":
            shutil.copyfile(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(shrink_config(config), indent=2))
    torch.manual_seed(seed)
    model = family.transformers_class()(AutoConfig.from_pretrained(str(dst)))
    kept: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():  # tied weights once, under their first name (as save_pretrained)
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            kept[name] = t.detach().contiguous()
    if _legacy(config):
        kept = {_rename(name, family.legacy_prefixes): t for name, t in kept.items()}
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str:
    for new, old in prefixes:
        if name.startswith(new):
            return old + name[len(new):]
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.model.tiny_release", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="a release's directory (config.json, tokenizer, processor files)")
    parser.add_argument("dst", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_release(args.src, args.dst, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
