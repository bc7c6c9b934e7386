"""``ifas-shards build``: one dataset (via its adapter) -> one shard set per split.

Why it is shaped this way:
- The sample order is deterministic (adapter files sorted, frames in order), so shard N of a
  rerun holds exactly what shard N of the first run held. After every finished shard the build
  records (shard entry, counts, skip counts, cursor into the item list) in ``build_state.json``;
  a rerun after an interruption keeps the finished shards whose sha256 still matches and
  continues at the cursor. ``manifest.json`` is written last; then the state file is removed.
- Bad input never stops a build: an unreadable image/video, a frame without a face or an
  unknown file name is skipped and counted by reason in the manifest (``skipped``), with a few
  example paths (``skipped_examples``), and the counts are printed at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from shards.adapters import Adapter, Item, Skip
from shards.captions import template_caption
from shards.errors import ShardsError
from shards.face_locations import FaceFileError, normalised, read_face_file
from shards.faces import FaceCropper
from shards.io import atomic_write_text, sha256_file
from shards.manifest import MANIFEST_NAME, read_manifest
from shards.video import MediaError, frame_indices, is_video, read_image, read_video_frames
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

STATE_NAME = "build_state.json"
BUILD_VERSION = 3  # 2: build_state.json keeps running totals; 3: frame_size, face_source, release faces
MAX_EXAMPLES = 5  # example paths kept per skip reason


@dataclass
class BuildOptions:
    """Everything that changes the bytes of the output (it is the resume fingerprint)."""

    frames: int = 10  # frames sampled per video, evenly spaced
    image_frames: int = 0  # images kept per frame folder (same ``video``), evenly spaced; 0 = all
    first_frames: int = 0  # > 0: sample only among each video's (or frame folder's) first N frames
    face: str = "auto"  # auto | release | detect | bbox | center | full (see shards.faces.FaceCropper)
    margin: float = 0.25
    size: int = 224
    center_fallback: bool = False
    jpeg_quality: int = 95
    max_samples: int = 1000  # per shard
    max_bytes: int = 256 * 1024 * 1024  # per shard
    splits: list[str] | None = None  # None = every split the adapter yields


class _Stop(Exception):
    """Raised after ``stop_after_shards`` new shards (time-boxed builds and the resume test)."""


def note_skip(counts: Counter, examples: dict[str, list[str]], reason: str, rel: str) -> None:
    """Count a skipped file or frame under ``reason``, keeping the first few paths as examples."""
    counts[reason] += 1
    if len(examples[reason]) < MAX_EXAMPLES:
        examples[reason].append(rel)


def sample_key(dataset: str, rel: str, frame: int) -> str:
    """Stable key from the source path; a hash suffix keeps keys unique when characters are replaced."""
    raw = f"{dataset}/{rel.rsplit('.', 1)[0]}".replace("/", "-")
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", raw)
    if base != raw:
        base += "_" + hashlib.sha1(rel.encode()).hexdigest()[:8]
    return f"{base}-f{frame:05d}"


def select_image_frames(items: list[Item], n: int, first: int = 0) -> list[Item]:
    """Keep ``n`` evenly spaced images (0: all) of every frame folder (items sharing ``video``), among its
    ``first`` images when > 0; videos untouched."""
    if n <= 0 and first <= 0:
        return items
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if not is_video(it.path):
            groups[it.video].append(it)
    spans = {v: g[:first] if first > 0 else g for v, g in groups.items()}
    keep = {id(g[i]) for g in spans.values() for i in (frame_indices(len(g), n) if n > 0 else range(len(g)))}
    return [it for it in items if is_video(it.path) or id(it) in keep]


class _SplitBuild:
    """Writes one split's shard set, resumably."""

    def __init__(
        self,
        adapter: Adapter,
        items: list[Item],
        out: Path,
        opts: BuildOptions,
        naming_skips: dict[str, Any],
        overwrite: bool,
    ) -> None:
        self.adapter, self.items, self.out, self.opts = adapter, items, out, opts
        self.naming_skips = naming_skips
        self.overwrite = overwrite
        self.cropper = FaceCropper(opts.face, opts.margin, opts.size, opts.center_fallback)
        self.fingerprint = {
            "adapter": adapter.name,
            "root": str(adapter.root.resolve()),
            "adapter_options": {k: str(v) for k, v in sorted(adapter.options.items())},
            "options": asdict(opts) | {"splits": None},
            "build_version": BUILD_VERSION,
            "items": len(items),
            "items_sha1": hashlib.sha1("\n".join(i.rel for i in items).encode()).hexdigest(),
        }
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.writer: ShardWriter | None = None
        self.state: list[dict[str, Any]] = []
        self.cursor = (0, 0)
        self.new_shards = 0
        self.stop_after: int | None = None

    # -- resume ------------------------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.out / STATE_NAME
        if self.overwrite or not path.is_file():
            return
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise ShardsError(
                f"{path}: left by a build with other inputs or options; rerun with --overwrite to start over"
            )
        for s in state["shards"]:  # keep the longest prefix of intact shards
            f = self.out / s["entry"]["file"]
            if not f.is_file() or f.stat().st_size != s["entry"]["bytes"] or sha256_file(f) != s["entry"]["sha256"]:
                log.warning("%s: changed or missing since the interrupted run; rebuilding from it", f)
                break
            self.state.append(s)
        if self.state:
            last = self.state[-1]
            self.cursor = tuple(last["cursor"])  # type: ignore[assignment]
            self.skipped = Counter(last["skipped"])
            self.examples = defaultdict(list, {k: list(v) for k, v in last["examples"].items()})
            log.info("%s: resuming after %d finished shard(s)", self.out, len(self.state))

    def _on_shard(self, entry: dict[str, Any]) -> None:
        assert self.writer is not None
        self.state.append(
            {
                "entry": entry,
                "counts": self.writer.counts,  # of every finished shard so far
                "cursor": list(self.cursor),
                "skipped": dict(self.skipped),
                "examples": {k: list(v) for k, v in self.examples.items()},
            }
        )
        atomic_write_text(
            self.out / STATE_NAME, json.dumps({"fingerprint": self.fingerprint, "shards": self.state}) + "\n"
        )
        self.new_shards += 1
        if self.stop_after is not None and self.new_shards >= self.stop_after:
            raise _Stop()

    # -- samples -----------------------------------------------------------------------------
    def _skip(self, rel: str, reason: str) -> None:
        note_skip(self.skipped, self.examples, reason, rel)

    def _release_faces(self, item: Item) -> dict[int, tuple[float, float, float, float]]:
        """The release's per-frame face boxes (pixels) of a video; {} when it ships none or they are not
        asked for (the detector then runs, or the dataset's per-image box is used)."""
        path = self.adapter.face_file(item) if self.opts.face in ("auto", "release", "bbox") else None
        if path is None:
            return {}
        try:
            return read_face_file(path, self.adapter.face_format)
        except (OSError, FaceFileError) as e:
            log.warning("%s: face locations unreadable, using the detector (%s)", path, e)
            return {}

    def _frames(self, item: Item) -> list[tuple[int, np.ndarray]]:
        if is_video(item.path):
            return read_video_frames(item.path, self.opts.frames, self.opts.first_frames)
        return [(0, read_image(item.path))]

    def samples(self) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
        """Samples from the cursor on; ``self.cursor`` always names the sample being yielded."""
        start_item, start_frame = self.cursor
        for i in range(start_item, len(self.items)):
            item = self.items[i]
            try:
                frames = self._frames(item)
            except MediaError as e:
                if i != start_item or start_frame == 0:
                    log.warning("%s", e)
                    self._skip(item.rel, e.reason)
                continue
            release = self._release_faces(item)
            for j, (fidx, rgb) in enumerate(frames):
                if i == start_item and j < start_frame:
                    continue
                self.cursor = (i, j)
                h, w = rgb.shape[:2]
                box = normalised(release[fidx], w, h) if fidx in release else item.bbox
                crop, face_source = self.cropper.crop_with_source(rgb, box)
                if crop is None:
                    self._skip(f"{item.rel}#{fidx}", "no_face")
                    continue
                key = sample_key(self.adapter.name, item.rel, fidx)
                buf = io.BytesIO()
                Image.fromarray(crop).save(buf, format="JPEG", quality=self.opts.jpeg_quality)
                meta = {
                    "label": item.label,
                    "attack": item.attack,
                    "dataset": self.adapter.dataset,
                    "subject": item.subject,
                    "video": item.video,
                    "frame": fidx,
                    "split": item.split,
                    "session": item.session,
                    "device": item.device,
                    "spoof_type": item.spoof_type,
                    "source": item.rel,
                    "caption": template_caption(item.attack, key),
                    "caption_source": "template",
                    "frame_size": [w, h],  # decoded width, height
                    "face_source": face_source,  # release | detector | center | full (counted in the manifest)
                    **{k: v for k, v in item.extra.items() if isinstance(v, (str, int, float))},
                    **self.adapter.frame_fields(item, w, h),
                }
                yield key, buf.getvalue(), meta
        self.cursor = (len(self.items), 0)

    def run(self, stop_after_shards: int | None = None) -> dict[str, Any] | None:
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / MANIFEST_NAME).is_file() and not (self.out / STATE_NAME).is_file() and not self.overwrite:
            m = read_manifest(self.out)
            if m.get("build", {}).get("fingerprint") == self.fingerprint:
                log.info("%s: already complete", self.out)
                return m
            raise ShardsError(
                f"{self.out}: holds a shard set built from other inputs or options; pass --overwrite to replace it"
            )
        self._load_state()
        self.stop_after = stop_after_shards
        writer = self.writer = ShardWriter(
            self.out,
            max_samples=self.opts.max_samples,
            max_bytes=self.opts.max_bytes,
            overwrite=True,
            resume_shards=[s["entry"] for s in self.state],
            resume_counts=self.state[-1]["counts"] if self.state else None,
            on_shard=self._on_shard,
        )
        try:
            for key, jpg, meta in self.samples():
                writer.write(key, jpg, meta)
            # close() finishes the last shard: when that one is the stop, the split is complete anyway
            self.stop_after = None
            writer.extra = {
                "skipped": dict(sorted(self.skipped.items())),
                "skipped_examples": dict(sorted(self.examples.items())),
                "skipped_files": self.naming_skips,
                "build": {"fingerprint": self.fingerprint},
            }
            manifest = writer.close()
        except _Stop:
            writer.abort()
            log.info("%s: stopped after %d new shard(s); rerun the same command to finish", self.out, self.new_shards)
            return None
        except BaseException:
            writer.abort()
            raise
        (self.out / STATE_NAME).unlink(missing_ok=True)
        return manifest


def build_dataset(
    adapter: Adapter,
    out: str | os.PathLike,
    opts: BuildOptions | None = None,
    *,
    overwrite: bool = False,
    stop_after_shards: int | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Build ``<out>/<split>/`` shard sets from an adapter; returns {split: manifest or None if stopped}.

    Files the adapter cannot name (``unknown_naming`` etc.) belong to no split; their counts go
    into every split's manifest under ``skipped_files``.
    """
    opts = opts or BuildOptions()
    if opts.face == "release" and not adapter.face_locations:
        raise ShardsError(f"--face release: {adapter.dataset} ships no face locations; use --face auto or detect "
                          "(the bundled detector), see docs/datasets.md")
    by_split: dict[str, list[Item]] = defaultdict(list)
    naming: Counter = Counter()
    naming_examples: dict[str, list[str]] = defaultdict(list)
    for it in adapter.items():
        if isinstance(it, Skip):
            note_skip(naming, naming_examples, it.reason, it.rel)
            continue
        if opts.splits is None or it.split in opts.splits:
            by_split[it.split].append(it)
    for reason, n in naming.items():
        log.warning("%s: %d file(s) skipped (%s), e.g. %s", adapter.root, n, reason, naming_examples[reason][0])
    if not by_split:
        raise ShardsError(
            f"{adapter.root}: no usable {adapter.dataset} files found "
            f"(skipped: {dict(naming) or 'none'}); check the root folder against docs/datasets.md"
        )
    naming_skips = {"counts": dict(sorted(naming.items())), "examples": dict(sorted(naming_examples.items()))}
    out = Path(out)
    result: dict[str, dict[str, Any] | None] = {}
    budget = stop_after_shards  # new shards left over all splits (None = no limit)
    for split in sorted(by_split):
        if budget is not None and budget <= 0:
            result[split] = None  # not started: the stop fell on the previous split's last shard
            break
        items = select_image_frames(by_split[split], opts.image_frames, opts.first_frames)
        build = _SplitBuild(adapter, items, out / split, opts, naming_skips, overwrite)
        result[split] = build.run(budget)
        if result[split] is None:
            break
        if budget is not None:
            budget -= build.new_shards
    return result


def format_report(result: dict[str, dict[str, Any] | None], out: str | os.PathLike) -> str:
    """The end-of-build summary: samples, label/attack counts and skip reasons per split."""
    lines = []
    for split, m in result.items():
        if m is None:
            lines.append(f"{Path(out) / split}: interrupted; rerun the same command to finish")
            continue
        c = m["counts"]
        lines.append(
            f"{Path(out) / split}: {m['num_samples']} samples in {len(m['shards'])} shards; "
            f"label {c.get('label', {})}; attack {c.get('attack', {})}"
        )
        if m.get("skipped"):
            lines.append(f"  skipped samples: {m['skipped']}")
    first = next((m for m in result.values() if m), None)
    if first and first.get("skipped_files", {}).get("counts"):
        lines.append(f"  skipped files (no split): {first['skipped_files']['counts']}")
    return "\n".join(lines)
