"""Predict on face images (console script ``ifas-predict``): judgment, liveness score and a
generated explanation per image.

    ifas-predict --model runs/demo/export face1.jpg face2.png

The score is P(Yes) among {Yes, No} at the first answer position (one forward pass); the
explanation is generated only when asked (default on; --no-explain skips it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from trainer.data import ImageTransform, collate
from trainer.dist import device
from trainer.evaluate import PROMPT_ONLY_MAX_LENGTH
from trainer.model import IFASModel, ModelLoadError
from trainer.prompt import PromptBuilder


@torch.no_grad()
def predict(model: IFASModel, tokenizer, paths: list[Path], threshold: float = 0.5, explain: bool = True,
            max_new_tokens: int = 48) -> list[dict[str, Any]]:
    dev = next(model.parameters()).device
    builder = PromptBuilder(tokenizer, model.num_image_tokens, PROMPT_ONLY_MAX_LENGTH)
    transform = ImageTransform(model.arch.image_size, model.arch.image_mean, model.arch.image_std)
    enc = builder.encode_prompt()
    samples = []
    for path in paths:
        image = Image.open(path)
        samples.append({"input_ids": enc.input_ids, "labels": enc.labels, "label_groups": enc.label_groups,
                        "score_position": enc.score_position, "pixel_values": transform(image), "live": 0,
                        "key": str(path), "meta": {}})
    batch = collate(samples, tokenizer.pad_token_id)
    inputs = {k: batch[k].to(dev) for k in ("input_ids", "attention_mask", "pixel_values", "score_positions")}
    scores = model(**inputs).scores.cpu().tolist()
    explanations = [""] * len(paths)
    if explain:
        new = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        explanations = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return [{"path": str(p), "judgment": "Yes" if s >= threshold else "No", "score": s, "threshold": threshold,
             "explanation": e} for p, s, e in zip(paths, scores, explanations)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ifas-predict", description="Is this photo of a real person?")
    parser.add_argument("--model", required=True, help="exported model directory (ifas-export / <run>/export)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score >= threshold means live")
    parser.add_argument("--no-explain", action="store_true", help="score only, no generated explanation")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--jsonl", action="store_true", help="print one JSON object per image")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    try:
        paths = [Path(p) for p in args.images]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"image {p} does not exist")
        model, tokenizer = IFASModel.from_pretrained(args.model)
        model.to(device()).eval()
        results = predict(model, tokenizer, paths, args.threshold, not args.no_explain, args.max_new_tokens)
    except (ModelLoadError, FileNotFoundError, UnidentifiedImageError) as exc:
        print(f"ifas-predict: error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        if args.jsonl:
            print(json.dumps(r))
        else:
            print(f"{r['path']}: {r['judgment']} (score {r['score']:.3f}) {r['explanation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
