"""Synthetic generator: schema, balance, captions, stable keys and order-independent determinism."""
from __future__ import annotations

import importlib.resources
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.captions import CAPTIONS
from shards.schema import validate_meta
from shards.synth import ALL_DOMAINS, BASE_CUES, DOMAINS, face_sources, make_sample


def _keywords() -> dict[str, list[str]]:
    """The SCF keyword dictionary K (docs/architecture.md, "Method") shipped with the shards package."""
    path = Path(str(importlib.resources.files("shards") / "data" / "keywords.json"))
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _mentions(text: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w.lower())}(s|es)?\b", text.lower()) for w in words)


def test_sources_are_faces() -> None:
    src = face_sources()
    assert len(src) == 101
    assert all(s.shape == (25, 25) for s in src[:100]) and src[100].shape[-1] == 3
    assert all(0.0 <= s.min() and s.max() <= 1.0 for s in src)


def test_at_least_four_domains_that_differ() -> None:
    assert len(ALL_DOMAINS) >= 4
    for field in ("cast", "noise", "jpeg", "resolution", "brightness"):
        assert len({str(DOMAINS[d][field]) for d in ALL_DOMAINS}) == len(ALL_DOMAINS), field


@pytest.mark.parametrize("domain", ALL_DOMAINS[:2])
def test_samples_follow_schema_and_balance(domain: str) -> None:
    samples = [make_sample(0, domain, i, image_size=64) for i in range(48)]
    keys = [k for k, _, _ in samples]
    assert keys == [f"{domain}-{i:06d}" for i in range(48)]
    attacks = Counter()
    for key, jpg, meta in samples:
        validate_meta(meta, key)
        attacks[meta["attack"]] += 1
        assert meta["dataset"] == meta["domain"] == domain
        assert meta["caption_source"] == "template" and meta["split"] in ("train", "val")
        assert meta["video"].startswith(f"{meta['subject']}_{meta['attack']}_")
        assert set(BASE_CUES[meta["attack"]]) <= set(meta["cues"])
        with Image.open(io.BytesIO(jpg)) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert attacks == {"none": 24, "print": 8, "replay": 8, "mask": 8}


def test_frames_of_a_video_share_subject_and_attack() -> None:
    a, b = make_sample(0, "domain_a", 6, image_size=64), make_sample(0, "domain_a", 7, image_size=64)
    assert a[2]["video"] == b[2]["video"] and a[2]["frame"] == 0 and b[2]["frame"] == 1
    assert a[1] != b[1]


def test_captions_name_their_attack() -> None:
    keywords = _keywords()
    spoof_words = [w for attack in ("print", "replay", "mask") for w in keywords[attack]]
    for attack in ("print", "replay", "mask"):
        for template in CAPTIONS[attack]:  # SCF keeps a spoof caption only with a keyword of its attack
            assert _mentions(template, keywords[attack]), template
    for template in CAPTIONS["none"]:
        assert _mentions(template, keywords["live"]) and not _mentions(template, spoof_words), template
    for i in range(24):
        caption = make_sample(3, "domain_c", i, image_size=64)[2]["caption"]
        assert "{" not in caption and caption.endswith(".")


def test_sample_depends_only_on_seed_domain_index() -> None:
    forward = [make_sample(5, "domain_d", i, image_size=64) for i in (0, 3, 11)]
    backward = [make_sample(5, "domain_d", i, image_size=64) for i in (11, 3, 0)][::-1]
    assert forward == backward
    assert make_sample(6, "domain_d", 3, image_size=64)[1] != forward[1][1]
    assert make_sample(5, "domain_c", 3, image_size=64)[1] != forward[1][1]


def test_spoof_cues_leave_local_texture() -> None:
    """Each attack changes the image beyond a global colour shift (guards against a no-op renderer)."""
    from shards.synth import RENDERERS, attack_params, render_live

    rng = np.random.default_rng(0)
    pose = {"angle": 0.0, "scale": 1.0, "dy": 0.0, "dx": 0.0, "flip": False}
    scene, lm = render_live(face_sources()[0], 128, rng, pose)
    for attack, render in RENDERERS.items():
        out, cues = render(scene, rng, attack_params(attack, rng), lm)
        assert out.shape == scene.shape and cues
        resid = (out - out.mean((0, 1))) - (scene - scene.mean((0, 1)))
        assert np.abs(resid).mean() > 0.008, attack
