"""Synthetic face anti-spoofing data: live faces, print/replay/mask attacks, four capture domains.

Behind ``ifas-shards synth`` and the demo data of ``make train``. One module per concern:

- ``faces``: the live faces (bundled with scikit-image), their landmarks, the live render;
- ``attacks``: print, screen replay and 3D mask renderers with their per-video parameters;
- ``domains``: the four capture domains, the presentation/capture pipeline, ``make_sample`` and
  the shard-set writers ``generate_domain``/``generate_demo``;
- ``difficulty``: the self-checks (global statistics must not transfer across domains, local
  texture and a tiny ViT must); ``python -m shards.synth`` runs the timed learnability check.

The names other code uses are importable from ``shards.synth`` itself.
"""
from __future__ import annotations

from shards.synth.attacks import (
    BASE_CUES,
    PRINT_SCREEN_ANGLES,
    RENDERERS,
    Rendered,
    attack_params,
    render_mask,
    render_print,
    render_replay,
)
from shards.synth.difficulty import (
    global_stats,
    global_stats_hter,
    hter_at_eer,
    learnability_hter,
    leave_one_domain_out_hter,
    load_arrays,
    local_texture_stats,
    main,
)
from shards.synth.domains import (
    ALL_DOMAINS,
    ATTACK_CYCLE,
    CLUTTER_COVER,
    DOMAINS,
    GENERATOR_VERSION,
    HF_TARGET,
    REPLAY_EXTRAS,
    capture,
    encode_jpeg,
    equalise_hf,
    generate_demo,
    generate_domain,
    hf_energy,
    make_sample,
    match_stats,
    presentation_jitter,
)
from shards.synth.faces import NUM_SUBJECTS, SKIN_TONES, Landmarks, face_sources, render_live

__all__ = [
    "ALL_DOMAINS", "ATTACK_CYCLE", "BASE_CUES", "CLUTTER_COVER", "DOMAINS", "GENERATOR_VERSION", "HF_TARGET",
    "NUM_SUBJECTS", "PRINT_SCREEN_ANGLES", "RENDERERS", "REPLAY_EXTRAS", "SKIN_TONES", "Landmarks", "Rendered",
    "attack_params", "capture", "encode_jpeg", "equalise_hf", "face_sources", "generate_demo", "generate_domain",
    "global_stats", "global_stats_hter", "hf_energy", "hter_at_eer", "learnability_hter", "leave_one_domain_out_hter",
    "load_arrays", "local_texture_stats", "main", "make_sample", "match_stats", "presentation_jitter", "render_live",
    "render_mask", "render_print", "render_replay",
]
