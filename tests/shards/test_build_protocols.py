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


def test_siw_protocol1_config_trains_on_the_first_60_frames(tmp_path: Path) -> None:
    """The config's own `# build:` commands, run on a SiW fixture tree, write the shard sets it names; its
    training samples come from each video's first 60 frames only, its test samples from whole videos."""
    import json
    import shlex

    import webdataset as wds

    from shards.cli import main
    from shards.fixtures import write_tree, write_video

    path = CONFIGS / "siw_protocol1.yaml"
    raw = tmp_path / "SiW"
    write_tree("siw", raw)
    for rel in ("Train/live/006/006-1-1-1-1.mov", "Test/spoof/090/090-1-3-4-1.mov"):
        write_video(raw / rel, frames=90)
    builds = [shlex.split(ln.split(":", 1)[1]) for ln in path.read_text().splitlines() if ln.startswith("# build:")]
    assert builds
    for argv in builds:
        assert argv[:3] == ["ifas-shards", "build", "siw"]
        argv = [str(raw) if a == "/data/SiW" else a for a in argv[1:]]
        argv[argv.index("--out") + 1] = str(tmp_path / argv[argv.index("--out") + 1])
        assert main([*argv, "--face", "center", "--size", "32"]) == 0
    cfg = load_config(path)
    for role, sets in (("train", cfg.data.train_shards), ("test", cfg.data.eval_shards)):
        frames = []
        for s in sets:
            urls = [str(p) for p in sorted((tmp_path / s).glob("*.tar"))]
            assert urls, f"{s} was not built by the config's build commands"
            frames += [json.loads(x["json"])["frame"] for x in wds.WebDataset(urls, shardshuffle=False)]
        assert (max(frames) < 60) == (role == "train"), role
