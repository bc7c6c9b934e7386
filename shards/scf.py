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

Captions are cached in ``<out>/captions.jsonl`` (``captions.rank<r>.jsonl`` per rank of a data-parallel run,
shards/caption_parallel.py) after every batch, so an interrupted run only captions what is missing; the new shard
set is written at the end (originals are never touched), with ``caption_source`` set and the kept/dropped report
(per dataset and attack) in its manifest. The keyword dictionary is ``shards/data/keywords.json`` (editable;
``--keywords`` for another).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from shards.caption_cache import (
    CACHE_GLOB,
    CACHE_NAME,  # noqa: F401 (re-exported: the one-process cache file)
    CacheAppender,
    cache_file,
    read_caches,
)
from shards.errors import ShardsError
from shards.io import open_image
from shards.keywords import find_cues, load_keywords
from shards.manifest import shard_paths
from shards.schema import CAPTION_PROMPT, image_member
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

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


def _samples(src: Path) -> Iterator[tuple[str, tuple[str, bytes], dict[str, Any]]]:
    """(key, (image extension, image bytes), metadata) of every sample of ``src``, in order."""
    import webdataset as wds

    # Every rank reads the whole set and picks its share itself (caption_share): no split by node or worker.
    whole = wds.WebDataset(shard_paths(src), shardshuffle=False, empty_check=False, nodesplitter=None,
                           workersplitter=None)
    for s in whole:
        yield s["__key__"], image_member(s, s["__key__"]), json.loads(s["json"])


def _wanted(only: str) -> tuple[str, ...]:
    return {"all": ("live", "spoof"), "spoof": ("spoof",), "live": ("live",)}[only]


def caption_share(
    src: str | Path,
    out: str | Path,
    captioner: Captioner,
    *,
    live_captioner: Captioner | None = None,
    only: str = "all",
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> int:
    """SCF steps 3/6 for one rank: caption this rank's share of ``src`` into its cache file in ``out``; returns
    how many captions it wrote. The k-th sample ``only`` selects (in manifest order) belongs to rank
    k % world_size, so every rank gets the same number of images within one, whatever the label order; every
    rank streams the whole set (tar reading is cheap next to generation: BENCHMARKS.md, "SCF captioning").
    Keys any cache file already holds are skipped, so a rerun after a kill captions only what is missing."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = read_caches(out)
    wanted = _wanted(only)
    # Memory holds one batch per captioner, whatever the set's size.
    pending: dict[bool, list[tuple[str, bytes]]] = {False: [], True: []}  # live? -> (key, image bytes)
    written = 0
    with CacheAppender(cache_file(out, rank, world_size)) as appender:

        def caption_pending(is_live: bool) -> None:
            nonlocal written
            batch, pending[is_live] = pending[is_live], []
            model = (live_captioner or captioner) if is_live else captioner
            images = [open_image(data) for _, data in batch]
            appender.append(zip((k for k, _ in batch), model.caption(images)))
            written += len(batch)

        index = -1
        for k, (_, data), meta in _samples(src):
            if meta["label"] not in wanted:
                continue
            index += 1
            if index % world_size != rank or k in cache:
                continue
            is_live = meta["label"] == "live"
            pending[is_live].append((k, data))
            if len(pending[is_live]) == batch_size:
                caption_pending(is_live)
        for is_live in (False, True):
            if pending[is_live]:
                caption_pending(is_live)
    log.info("rank %d of %d: %d captions written to %s", rank, world_size, written, cache_file(out, rank, world_size))
    return written


def write_scf_set(
    src: str | Path,
    out: str | Path,
    *,
    only: str = "all",
    source: str = "general",
    live_source: str = "general",
    keywords: dict | None = None,
    max_samples: int = 1000,
) -> dict[str, Any]:
    """The merge: write the captioned shard set ``out`` from ``src`` and every cache file in ``out``, in
    ``src``'s order (so the output does not depend on how many ranks captioned it); spoof captions without
    their attack's keywords are dropped when ``keywords`` is given. Returns the manifest (``scf``: the report).
    A sample without a caption stops the merge before a manifest is written."""
    src, out = Path(src), Path(out)
    cache = read_caches(out)
    wanted = _wanted(only)
    report: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    missing: list[str] = []
    with ShardWriter(out, max_samples=max_samples, overwrite=True) as w:
        for k, (ext, data), meta in _samples(src):
            if meta["label"] not in wanted:
                continue
            caption = cache.get(k)
            if caption is None:
                missing.append(k)
                continue
            ok = meta["label"] == "live" or keywords is None or keeps(caption, meta["attack"], keywords)
            report[meta["dataset"]][meta["attack"]]["kept" if ok else "dropped"] += 1
            if ok:
                src_name = live_source if meta["label"] == "live" else source
                w.write(k, data, {**meta, "caption": caption, "caption_source": src_name}, ext=ext)
        if missing:
            raise ShardsError(
                f"{out}: {len(missing)} sample(s) of {src} have no caption in {out}/{CACHE_GLOB} (first: {missing[0]});"
                " run the captioning again (every rank, without --merge): it captions only what is missing"
            )
        w.extra = {
            "scf": {
                "source_set": str(src),
                "filtered": keywords is not None,
                "only": only,
                "report": {d: {a: dict(c) for a, c in sorted(v.items())} for d, v in sorted(report.items())},
            }
        }
    return w.manifest  # type: ignore[return-value]


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
    """Caption ``src`` into a new shard set ``out`` in one process; returns its manifest (``scf``: the report)."""
    keywords = load_keywords(keywords_path) if filter_spoof else None  # a bad path fails before any captioning
    caption_share(src, out, captioner, live_captioner=live_captioner, only=only, batch_size=batch_size)
    return write_scf_set(
        src,
        out,
        only=only,
        source=source,
        live_source=live_source(source, live_captioner is not None),
        keywords=keywords,
        max_samples=max_samples,
    )


def live_source(source: str, live_captioner: bool) -> str:
    """caption_source of live images: SCF step 6 captions them with the general captioner."""
    return "general" if live_captioner else source


def format_scf_report(manifest: dict[str, Any]) -> str:
    lines = [f"{manifest['name']}: {manifest['num_samples']} samples written"]
    for d, attacks in manifest["scf"]["report"].items():
        for a, c in attacks.items():
            lines.append(f"  {d:20s} {a:8s} kept={c.get('kept', 0)} dropped={c.get('dropped', 0)}")
    return "\n".join(lines)
