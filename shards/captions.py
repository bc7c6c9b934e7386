"""Template captions: per attack type, sentences naming its physical cues.

They caption the synthetic demo (``shards.synth``), every real dataset built without a captioner
(``shards.build``), and the template-captions ablation (``data.caption_source=template``). SCF
captions (``shards.scf``) replace them when a captioner is given.
"""
from __future__ import annotations

import hashlib

CAPTIONS: dict[str, tuple[str, ...]] = {
    "none": (
        "The face shows natural skin texture, consistent lighting and real depth; no spoof artifacts are visible.",
        "This is a real person: fine skin detail, soft natural shadows and a head with real depth.",
        "A live face: the skin texture looks natural and the shading follows the shape of the head.",
        "Natural skin with fine pores, even colour transitions and real depth; nothing suggests an attack.",
    ),
    "print": (
        "This is a printed photo: halftone dots, paper texture and faded colours are visible.",
        "Not a real person: the face is printed on paper, with a regular ink dot pattern and washed-out colours.",
        "A photo print is held to the camera; halftone ink dots, paper grain and a reduced colour range give it away.",
        "The image shows a paper print of a face: a fine dot screen covers the skin and the colours look flat.",
    ),
    "replay": (
        "This face is replayed on a screen: a pixel grid, moire stripes and glare from the display are visible.",
        "Not a real person: the face is shown on a display, with fine sub-pixel lines and moire bands across it.",
        "A screen replay attack: the monitor's pixel grid and wavy moire patterns cover the face{extra}.",
        "The face is on a digital display; its pixel structure, moire interference and shifted tones "
        "are visible{extra}.",
    ),
    "mask": (
        "The person wears a mask: the skin is smooth like plastic, seams run along the face outline and "
        "the eye holes have sharp edges.",
        "Not a real face: a 3D mask with a uniform plastic tone, a visible seam at its edge and cut-out eye holes.",
        "A mask attack: unnaturally smooth skin without pores, a sharp seam around the face and dark eye holes.",
        "The face is a mask made of resin or silicone: flat, waxy skin, edge seams and holes cut for the eyes.",
    ),
}
OTHER_CAPTION = "This is not a real person: the face is presented by an attack instrument, not a live face."


def template_caption(attack: str, key: str) -> str:
    """A stable template sentence for the attack type (the fallback when no captioner is used)."""
    options = CAPTIONS.get(attack)
    if not options:
        return OTHER_CAPTION
    pick = int(hashlib.sha1(key.encode()).hexdigest(), 16) % len(options)
    return options[pick].format(extra="")
