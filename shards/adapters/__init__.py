"""Dataset adapters: turn a dataset folder into ``Item``s (path + label/attack/subject/split)."""
from __future__ import annotations

from shards.adapters.base import Adapter, AdapterError, Item, Skip, SkipFile
from shards.adapters.generic import FolderAdapter, ListFileAdapter
from shards.adapters.masks import WMCA, CasiaSurf3DMask, HiFiMask, HkbuMars
from shards.adapters.multi_attack import CelebASpoof, RoseYoutu, SiW, SiWMV2
from shards.adapters.ocim import CasiaMFSD, MsuMFSD, OuluNPU, ReplayAttack

ADAPTERS: dict[str, type[Adapter]] = {
    a.name: a for a in (OuluNPU, CasiaMFSD, ReplayAttack, MsuMFSD, CelebASpoof, SiW, SiWMV2, HiFiMask,
                        CasiaSurf3DMask, HkbuMars, RoseYoutu, WMCA, ListFileAdapter, FolderAdapter)
}


def get_adapter(name: str, root: str, **options) -> Adapter:
    """Instantiate the adapter called ``name`` (one of ``ADAPTERS``) on ``root``."""
    if name not in ADAPTERS:
        raise AdapterError(f"unknown dataset {name!r}: choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[name](root, **options)


__all__ = ["ADAPTERS", "Adapter", "AdapterError", "Item", "Skip", "SkipFile", "get_adapter"]
