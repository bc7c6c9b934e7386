"""Spoof-aware Captioning and Filtering (SCF, docs/architecture.md "Method") over shard sets.

    # 3-4: general captioner C_G on spoof images; keep captions naming their attack's keywords
    ifas-shards caption data/shards/oulu_npu/train --out data/scf/general/oulu_npu --captioner /models/C_G \
        --only spoof --filter --source general
    # 5: fine-tune C_G on the kept captions with this trainer (data.task=caption) and export it as LLaVA
    deepspeed launch/train.sh --config launch/configs/scf_captioner.yaml model.path=/models/C_G \
        "data.train_shards=[data/scf/general/oulu_npu]" train.output_dir=runs/C_S
    ifas-export runs/C_S --format llava --out /models/C_S
    # 6: spoof images with the spoof-aware captioner C_S, live images with C_G
    ifas-shards caption data/shards/oulu_npu/train --out data/scf/final/oulu_npu --captioner /models/C_S \
        --live-captioner /models/C_G --source spoof_aware

Captions are cached in ``<out>/captions.jsonl`` after every batch, so an interrupted run only
captions what is missing; the new shard set is written at the end (originals are never touched),
with ``caption_source`` set and the kept/dropped report (per dataset and attack) in its manifest.
The keyword dictionary is ``shards/data/keywords.json`` (editable; ``--keywords`` for another).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from shards.errors import ShardsError
from shards.keywords import find_cues, load_keywords
from shards.manifest import shard_paths
from shards.schema import CAPTION_PROMPT
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

CACHE_NAME = "captions.jsonl"


def keeps(caption: str, attack: str, keywords: dict) -> bool:
    """SCF step 4: a spoof caption is kept only if it names a keyword of its own attack type.

    Attack types without a keyword group (e.g. ``other``) accept any attack group's keyword.
    """
    found = find_cues(caption, keywords)
    if attack in keywords:
        return bool(found.get(attack))
    return any(found.get(g) for g in keywords if g != "live")


def captioner_prompt(processor, prompt: str) -> str:
    """The text a captioner is prompted with, one ``<image>`` slot included: the processor's chat
    template, else the tokenizer's, else ``<image>\n{prompt}\n``. Captioning and the captioner's
    fine-tuning (``data.task=caption``) both build it here, so the two always agree."""
    tok = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", None) or "<image>"
    text = ""
    if processor is not tok and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    elif getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"{image_token}\n{prompt}"}], add_generation_prompt=True, tokenize=False
        )
    if text.count(image_token) != 1:  # no template, or one that drops (or repeats) the image slot
        text = f"{image_token}\n{prompt}\n"
    return text


class Captioner:
    """A local image-text-to-text checkpoint (processor + model) that captions batches of images."""

    def __init__(
        self, path: str | Path, device: str = "auto", prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = Path(path)
        if not p.is_dir():
            raise ShardsError(
                f"{p}: captioner checkpoint directory not found (pass a local transformers checkpoint dir)"
            )
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.processor = AutoProcessor.from_pretrained(p)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(p, dtype=dtype).to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", self.processor)
        tok.padding_side = "left"  # generation continues from the right end of every row
        self.tokenizer = tok
        self.max_new_tokens = max_new_tokens
        self.prompt = captioner_prompt(self.processor, prompt)

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _samples(src: Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    import webdataset as wds

    for s in wds.WebDataset(shard_paths(src), shardshuffle=False, empty_check=False):
        yield s["__key__"], s["jpg"], json.loads(s["json"])


def caption_shard_set(
    src: str | Path,
    out: str | Path,
    captioner: Captioner,
    *,
    live_captioner: Captioner | None = None,
    only: str = "all",
    source: str = "general",
    filter_spoof: bool = False,
    keywords_path: str | None = None,
    batch_size: int = 8,
    max_samples: int = 1000,
) -> dict[str, Any]:
    """Caption ``src`` into a new shard set ``out``; returns its manifest (``scf`` holds the report)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / CACHE_NAME
    cache: dict[str, str] = {}
    if cache_path.is_file():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                cache[rec["key"]] = rec["caption"]
        log.info("%s: %d cached captions", cache_path, len(cache))
    wanted = {"all": ("live", "spoof"), "spoof": ("spoof",), "live": ("live",)}[only]
    keywords = load_keywords(keywords_path) if filter_spoof else {}  # a bad path fails before any captioning
    # Pass 1 captions what the cache lacks; pass 2 writes. The source set is streamed both times, so
    # memory holds one batch per captioner, whatever the set's size.
    pending: dict[bool, list[tuple[str, bytes]]] = {False: [], True: []}  # live? -> (key, jpg)
    with open(cache_path, "a", encoding="utf-8") as f:

        def caption_pending(is_live: bool) -> None:
            batch, pending[is_live] = pending[is_live], []
            model = (live_captioner or captioner) if is_live else captioner
            images = [Image.open(io.BytesIO(j)).convert("RGB") for _, j in batch]
            for (k, _), text in zip(batch, model.caption(images)):
                cache[k] = text
                f.write(json.dumps({"key": k, "caption": text}) + "\n")
            f.flush()

        for k, jpg, meta in _samples(src):
            if meta["label"] in wanted and k not in cache:
                is_live = meta["label"] == "live"
                pending[is_live].append((k, jpg))
                if len(pending[is_live]) == batch_size:
                    caption_pending(is_live)
        for is_live in (False, True):
            if pending[is_live]:
                caption_pending(is_live)
    report: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    with ShardWriter(out, max_samples=max_samples, overwrite=True) as w:
        for k, jpg, meta in _samples(src):
            if meta["label"] not in wanted:
                continue
            caption = cache[k]
            ok = meta["label"] == "live" or not filter_spoof or keeps(caption, meta["attack"], keywords)
            report[meta["dataset"]][meta["attack"]]["kept" if ok else "dropped"] += 1
            if not ok:
                continue
            src_name = "general" if (meta["label"] == "live" and live_captioner is not None) else source
            w.write(k, jpg, {**meta, "caption": caption, "caption_source": src_name})
        w.extra = {
            "scf": {
                "source_set": str(src),
                "filtered": filter_spoof,
                "only": only,
                "report": {d: {a: dict(c) for a, c in sorted(v.items())} for d, v in sorted(report.items())},
            }
        }
    return w.manifest  # type: ignore[return-value]


def format_scf_report(manifest: dict[str, Any]) -> str:
    lines = [f"{manifest['name']}: {manifest['num_samples']} samples written"]
    for d, attacks in manifest["scf"]["report"].items():
        for a, c in attacks.items():
            lines.append(f"  {d:20s} {a:8s} kept={c.get('kept', 0)} dropped={c.get('dropped', 0)}")
    return "\n".join(lines)


def add_caption_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="shard set to caption (left untouched)")
    p.add_argument("--out", required=True, help="new shard set with the captions")
    p.add_argument(
        "--captioner", help="local image-text-to-text checkpoint dir (spoof images; all if no --live-captioner)"
    )
    p.add_argument("--live-captioner", help="checkpoint dir for live images (SCF step 6: the general captioner)")
    p.add_argument("--only", choices=["all", "spoof", "live"], default="all", help="caption and keep only these labels")
    p.add_argument(
        "--source",
        choices=["general", "spoof_aware"],
        default="general",
        help="caption_source of --captioner's captions",
    )
    p.add_argument("--filter", action="store_true", help="drop spoof captions without their attack type's keywords")
    p.add_argument("--keywords", help="keyword dictionary JSON (default shards/data/keywords.json)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt", default=CAPTION_PROMPT)


def main_caption(args: argparse.Namespace) -> int:
    if not args.captioner:
        print("no --captioner given: the shards keep their template captions (caption_source=template)")
        return 0
    cap = Captioner(args.captioner, args.device, args.prompt, args.max_new_tokens)
    live = (
        Captioner(args.live_captioner, args.device, args.prompt, args.max_new_tokens) if args.live_captioner else None
    )
    manifest = caption_shard_set(
        args.src,
        args.out,
        cap,
        live_captioner=live,
        only=args.only,
        source=args.source,
        filter_spoof=args.filter,
        keywords_path=args.keywords,
        batch_size=args.batch_size,
    )
    print(format_scf_report(manifest))
    return 0
