"""Saving a family's transformers processor, also where its video processor cannot be built.

transformers builds the processors of the video-capable families (InternVL, LLaVA-OneVision, Qwen-VL) with a
video processor, which needs torchvision; PyPI's torchvision does not import beside a CPU-only torch
(docs/architecture.md, "Known traps"). Without torchvision the same files are written piece by piece
(image processor, tokenizer, chat template, processor_config.json), meant for AutoProcessor on a machine
that has torchvision (not verified on this project's CPU machines); this project never needs the
processor object itself.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("ifas.model")

def save_processor(processor_class: str, image_processor, tokenizer, chat_template: str | None,
                   directory: str | Path, video_processor_class: str | None = None, **settings: Any) -> None:
    """Write ``processor_class(image_processor, tokenizer, chat_template=..., **settings)`` to ``directory``;
    ``video_processor_class``: the video processor transformers builds that processor with (None: none)."""
    import transformers

    cls = getattr(transformers, processor_class)
    parts = {"image_processor": image_processor, "tokenizer": tokenizer}
    d = Path(directory)
    if video_processor_class is None or importlib.util.find_spec("torchvision") is not None:
        if video_processor_class is not None:
            parts["video_processor"] = getattr(transformers, video_processor_class)()
        cls(**parts, chat_template=chat_template, **settings).save_pretrained(str(d))
        # transformers 5 keeps the image processor inside processor_config.json; readers of the release layout
        # (transformers 4, inference servers, this project's loader) look for preprocessor_config.json
        image_processor.save_pretrained(str(d))
        return
    log.warning("torchvision is not installed: writing %s's files without its video processor", processor_class)
    d.mkdir(parents=True, exist_ok=True)
    image_processor.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    if chat_template is not None:
        (d / "chat_template.jinja").write_text(chat_template)
    (d / "processor_config.json").write_text(json.dumps({"processor_class": processor_class, **settings},
                                                        indent=2) + "\n")
