"""Interpretability metrics counted on fixed strings with the SCF keyword dictionary."""
import math

import pytest

from shards.keywords import find_cues, load_keywords
from trainer.eval.explain import Explained, SampleKeeper, clean_explanation, explanation_metrics


@pytest.fixture(scope="module")
def keywords():
    return load_keywords()


def test_dictionary_groups(keywords):
    assert {"print", "replay", "mask", "live"} <= set(keywords)
    # the method's dictionary K (docs/architecture.md) is in it
    for group, words in {"replay": ["screen", "display", "monitor", "moire", "pixel", "reflection"],
                         "print": ["paper", "printed", "photo", "print"],
                         "mask": ["mask", "mannequin", "silicone", "resin", "3d"]}.items():
        assert {(w,) for w in words} <= set(keywords[group]), group


@pytest.mark.parametrize("text, expected", [
    ("Moiré stripes on a SCREEN.", {"replay": {"moire", "screen"}}),
    ("sub-pixel lines and pixels", {"replay": {"pixel", "sub pixel"}}),
    ("It is printed on paper with halftone dots", {"print": {"printed", "paper", "halftone"}}),
    ("A 3D mask made of silicone", {"mask": {"3d", "3d mask", "mask", "silicone"}}),
    ("Natural skin texture, no moire and without any screen", {"live": {"natural skin", "skin texture",
                                                                        "natural skin texture"}}),
    ("Not a real person: the face is shown on a display", {"replay": {"display"}}),
    ("screenshot masked", {}),  # whole words only
    ("", {}),
])
def test_find_cues(keywords, text, expected):
    assert find_cues(text, keywords) == expected


def _r(attack, judgment, text, mode="greedy", key="k"):
    return Explained(key, attack, 0.5, judgment, mode, text)


def test_rates_count_correctly(keywords):
    records = [
        _r("replay", "No", "The face is on a screen with moire."),           # true cue
        _r("replay", "No", "Printed on paper."),                             # other type only
        _r("print", "No", "Halftone dots and paper grain."),                 # true cue
        _r("mask", "Yes", "A silicone mask."),                               # true cue, contradicts Yes
        _r("none", "Yes", "Natural skin texture and real depth."),           # live cue
        _r("none", "Yes", "Bright screen glare on the face."),               # contradicts Yes
        _r("none", "No", "Natural skin with pores."),                        # contradicts No (live cues only)
        _r("none", "No", "Hard to tell."),                                   # no cue: not a contradiction
    ]
    m = explanation_metrics(records, keywords)
    assert (m["samples"], m["spoof_samples"], m["live_samples"]) == (8, 4, 4)
    assert m["cue_hit_rate"] == pytest.approx(3 / 4)
    assert m["cue_hit_rate_per_attack"] == {"mask": 1.0, "print": 1.0, "replay": 0.5}
    assert m["wrong_cue_rate"] == pytest.approx(1 / 4)
    assert m["live_cue_rate"] == pytest.approx(2 / 4)
    assert m["contradiction_rate"] == pytest.approx(3 / 8)
    assert m["empty_rate"] == 0.0


def test_empty_input_gives_nan(keywords):
    m = explanation_metrics([], keywords)
    assert m["samples"] == 0 and math.isnan(m["cue_hit_rate"]) and math.isnan(m["contradiction_rate"])


def test_clean_and_keeper():
    import torch

    assert clean_explanation(". The face is on paper.") == "The face is on paper."
    keeper = SampleKeeper(per_type=2)
    batch = {"meta": [{"attack": a} for a in ["none", "none", "none", "print", "mask"]],
             "keys": list("abcde"), "pixel_values": torch.zeros(5, 3, 2, 2), "input_ids": torch.zeros(5, 4)}
    keeper.offer(batch)
    assert [s["key"] for s in keeper.select(4)] == ["e", "a", "d", "b"]  # round-robin: mask, none, print
    assert len(keeper.select(10)) == 4
