"""What a model was trained on: the training shard sets' sources, from their manifests
(``shards.manifest.data_source``), written as ``training_data.json`` into the run's model_config/ and
copied into every export, so ``ifas-predict`` and ``ifas-eval`` can say when a model has only ever seen
synthetic faces (README, "What the demo model can judge")."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shards.manifest import MANIFEST_NAME, ManifestError, data_source, read_manifest
from trainer.data.shard_sets import resolve_shards
from trainer.run_dir import TRAINING_DATA

log = logging.getLogger(__name__)

SYNTHETIC_ONLY = ("trained only on synthetic shards ({sets}): it has never seen a real face, so its judgments "
                  "and explanations on real photos mean nothing (README, \"What the demo model can judge\")")


def training_data(specs: list[str]) -> dict[str, Any]:
    """{"sets": [{path, name, source, num_samples, datasets}], "synthetic_only": bool} of the training
    shard-set specs (directories, globs, brace patterns); a set without a manifest is ``unknown``."""
    sets = []
    for spec in specs:
        for directory in sorted({str(Path(u).parent) for u in resolve_shards([spec], "data.train_shards")}):
            entry: dict[str, Any] = {"path": directory, "source": "unknown"}
            if (Path(directory) / MANIFEST_NAME).is_file():
                try:
                    m = read_manifest(directory)
                except ManifestError:
                    m = None
                if m is not None:
                    entry.update(name=m["name"], source=data_source(m), num_samples=m["num_samples"],
                                 datasets=m["counts"].get("dataset", {}))
            sets.append(entry)
    return {"sets": sets, "synthetic_only": bool(sets) and all(s["source"] == "synthetic" for s in sets)}


def synthetic_only_note(model_dir: str | Path) -> str | None:
    """The one-line notice for a model trained only on synthetic shards; None otherwise, or when the model
    directory does not say (an export from before training_data.json existed)."""
    path = Path(model_dir) / TRAINING_DATA
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON; cannot tell what the model was trained on", path)
        return None
    if not data.get("synthetic_only"):
        return None
    names = ", ".join(s.get("name", s["path"]) for s in data["sets"])
    return "this model was " + SYNTHETIC_ONLY.format(sets=names)
