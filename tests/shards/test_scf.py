"""SCF: a tiny captioner saved with save_pretrained captions a shard set end to end (resumably),
and the keyword filter keeps/drops the right captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from shards.adapters import get_adapter
from shards.bench.caption import save_tiny_captioner
from shards.build import BuildOptions, build_dataset
from shards.fixtures import write_image
from shards.manifest import read_manifest, shard_paths
from shards.scf import CACHE_NAME, Captioner, caption_shard_set, keeps


@pytest.mark.parametrize(
    "caption,attack,kept",
    [
        ("A printed photo on paper with halftone dots.", "print", True),
        ("The face is shown on a phone screen with moiré.", "replay", True),
        ("The face is shown on a phone screen with moiré.", "print", False),  # wrong attack's keywords
        ("A man in a white suit smiling.", "print", False),
        ("No screen or pixel grid is visible.", "replay", False),  # negated keywords do not count
        ("Smooth silicone masks with seams.", "mask", True),  # plural
        ("A face behind a plastic shape.", "other", True),  # no own group: any attack keyword
    ],
)
def test_keyword_filter(caption: str, attack: str, kept: bool) -> None:
    from shards.keywords import load_keywords

    assert keeps(caption, attack, load_keywords()) is kept


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory) -> Path:
    from trainer.sample.tokenizer import build_demo_tokenizer

    # the demo tokenizer (with a chat template) also lets the slow test fine-tune this captioner with the trainer
    tok = build_demo_tokenizer(["a printed photo on paper", "a face on a screen", "a real person"], vocab_size=300)
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"), tokenizer=tok)


def test_caption_shard_set_end_to_end(tmp_path: Path, tiny_captioner: Path) -> None:
    for rel in ("live/a/0.png", "live/b/0.png", "spoof/print/c/0.png", "spoof/replay/d/0.png", "spoof/replay/e/0.png"):
        write_image(tmp_path / "raw" / rel)
    build_dataset(get_adapter("folder", str(tmp_path / "raw")), tmp_path / "shards", BuildOptions(size=32))
    src = tmp_path / "shards" / "all"
    before = (src / "manifest.json").read_text()
    cap = Captioner(tiny_captioner, device="cpu", max_new_tokens=6)

    out = tmp_path / "general"
    m = caption_shard_set(src, out, cap, only="spoof", filter_spoof=True, batch_size=2)
    report = m["scf"]["report"]["raw"]
    assert sum(report["print"].values()) == 1 and sum(report["replay"].values()) == 2
    cache = [json.loads(x) for x in (out / CACHE_NAME).read_text().splitlines()]
    assert len(cache) == 3
    kept = sum(c.get("kept", 0) for c in report.values())
    assert read_manifest(out)["num_samples"] == kept
    assert (src / "manifest.json").read_text() == before  # originals untouched

    final = tmp_path / "final"
    (final).mkdir()
    # a cached caption is reused (resume): the captioner is not asked for it again
    first_key = next(iter(wds.WebDataset(shard_paths(src), shardshuffle=False)))["__key__"]
    (final / CACHE_NAME).write_text(json.dumps({"key": first_key, "caption": "cached caption"}) + "\n")
    m = caption_shard_set(src, final, cap, live_captioner=cap, source="spoof_aware", batch_size=4)
    metas = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(shard_paths(final), shardshuffle=False)}
    assert len(metas) == 5 and metas[first_key]["caption"] == "cached caption"
    assert {(x["label"], x["caption_source"]) for x in metas.values()} == {
        ("live", "general"),
        ("spoof", "spoof_aware"),
    }
    assert all(isinstance(x["caption"], str) for x in metas.values())
    assert len((final / CACHE_NAME).read_text().splitlines()) == 5


# The caption SCF step 5 teaches: it names print (printed, paper) and replay (screen) cues, so the
# keyword filter keeps it for either attack; the untrained tiny captioner never writes it.
TAUGHT = "a printed photo on paper held before a screen"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_scf_steps_3_to_6_with_this_trainer(tmp_path: Path, tiny_captioner: Path) -> None:
    """General captions -> keyword filter -> fine-tune the captioner with ifas-train (data.task=caption,
    2 ZeRO-3 ranks) -> ifas-export --format llava -> re-caption spoof images with it, live with C_G."""
    import subprocess
    import sys

    from shards.keywords import load_keywords
    from tests.helpers import DEEPSPEED, ROOT, launch_env
    from trainer.dist import free_port

    for i in range(3):
        write_image(tmp_path / "raw" / f"live/s{i}/0.png")
    for i in range(8):
        write_image(tmp_path / "raw" / f"spoof/{'print' if i % 2 else 'replay'}/s{i}/0.png")
    build_dataset(get_adapter("folder", str(tmp_path / "raw")), tmp_path / "shards", BuildOptions(size=32))
    src = tmp_path / "shards" / "all"
    metas = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(shard_paths(src), shardshuffle=False)}
    spoof = sorted(k for k, m in metas.items() if m["label"] == "spoof")
    assert len(metas) == 11 and len(spoof) == 8

    # steps 3-4: C_G captions the spoof images. Six of its captions stand cached (as if from a real
    # C_G): four name their attack's cues, two do not; it writes the other two itself.
    general = tmp_path / "general"
    general.mkdir()
    cached = {k: TAUGHT if i < 4 else "a person in a room" for i, k in enumerate(spoof[:6])}
    (general / CACHE_NAME).write_text("".join(json.dumps({"key": k, "caption": c}) + "\n" for k, c in cached.items()))
    cap_g = Captioner(tiny_captioner, device="cpu", max_new_tokens=12)
    m = caption_shard_set(src, general, cap_g, only="spoof", filter_spoof=True, batch_size=4)
    own = [json.loads(x)["caption"] for x in (general / CACHE_NAME).read_text().splitlines()[6:]]
    assert len(own) == 2 and not any(keeps(c, "print", load_keywords()) for c in own)
    assert m["num_samples"] == 4  # exactly the cached captions with their attack's cues

    # step 5: fine-tune C_G on the kept captions with this project's trainer
    run = tmp_path / "run"
    env = launch_env()
    cmd = [
        *DEEPSPEED,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.sh",
        "--config",
        "launch/configs/scf_captioner.yaml",
        f"model.llava_path={tiny_captioner}",
        f"data.train_shards=[{general}]",
        f"train.output_dir={run}",
        "train.max_steps=60",
        "train.micro_batch_size=2",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "train.log_every=10",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [h["loss"] for h in json.loads((run / "train_result.json").read_text())["history"]]
    assert losses[-1] < 0.2 * losses[0], losses
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli.export", str(run), "--format", "llava"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # step 6: spoof images with the spoof-aware captioner, live ones with C_G
    cap_s = Captioner(run / "export", device="cpu", max_new_tokens=32)
    final = tmp_path / "final"
    m = caption_shard_set(
        src, final, cap_s, live_captioner=cap_g, source="spoof_aware", filter_spoof=True, batch_size=4
    )
    out = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(shard_paths(final), shardshuffle=False)}
    assert m["num_samples"] == len(metas) == 11  # every spoof caption now names its attack's cues
    assert {k for k, x in out.items() if x["caption_source"] == "spoof_aware"} == set(spoof)
    assert all(out[k]["caption"] == TAUGHT for k in spoof)
    assert {x["caption_source"] for x in out.values() if x["label"] == "live"} == {"general"}


def test_a_png_member_is_captioned_and_kept_as_png(tmp_path: Path, tiny_captioner: Path) -> None:
    """A hand-made set may hold .png images (shards/schema.py); SCF reads them like the loader and writes them back
    under their own extension, not relabelled as .jpg."""
    import io

    from PIL import Image

    from shards.writer import ShardWriter

    meta = {"label": "spoof", "attack": "print", "dataset": "hand", "subject": "s0", "video": "v0", "caption": "",
            "caption_source": "none"}
    images = {}
    with ShardWriter(tmp_path / "src") as w:
        for i in range(2):
            buf = io.BytesIO()
            Image.new("I;16", (24, 24), 40000 + i).save(buf, format="PNG")  # 16-bit grey
            images[f"k{i}"] = buf.getvalue()
            w.write(f"k{i}", images[f"k{i}"], {**meta, "video": f"v{i}"}, ext="png")
    m = caption_shard_set(tmp_path / "src", tmp_path / "out", Captioner(tiny_captioner, device="cpu", max_new_tokens=3))
    assert m["num_samples"] == 2
    written = list(wds.WebDataset(shard_paths(tmp_path / "out"), shardshuffle=False, empty_check=False))
    assert {s["__key__"]: s["png"] for s in written} == images and not any("jpg" in s for s in written)
