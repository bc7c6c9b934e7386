"""The OCIM and One-to-Eleven run configs load and name shard sets the build writes."""
from __future__ import annotations

from pathlib import Path

import pytest

from shards.adapters import ADAPTERS
from shards.adapters.base import SPLITS
from trainer.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "configs"


@pytest.mark.parametrize("name", ["ocim_oci_to_m", "ocim_oim_to_c", "ocim_ocm_to_i", "ocim_cim_to_o", "one_to_eleven"])
def test_protocol_config_loads(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    sets = cfg.data.train_shards + cfg.data.eval_shards
    for s in sets:  # data/shards/<adapter>/<split>: exactly what `ifas-shards build` writes
        _, _, dataset, split = s.split("/")
        assert dataset in ADAPTERS and split in SPLITS
    train = {s.split("/")[2] for s in cfg.data.train_shards}
    test = {s.split("/")[2] for s in cfg.data.eval_shards}
    assert not train & test  # cross-domain: the target never leaks into training
    if name == "one_to_eleven":
        assert train == {"celeba_spoof"} and len(test) == 11
    else:
        assert len(train) == 3 and len(test) == 1
