"""ShardWriter, manifests and ``ifas-shards verify``: shards must read back intact with webdataset."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from shards.cli import main as cli_main
from shards.manifest import ManifestError, read_manifest, shard_paths
from shards.schema import SchemaError
from shards.synth import generate_domain, make_sample
from shards.writer import ShardWriter

SIZE = 64  # small images keep these tests fast


def _samples(n: int, domain: str = "domain_a", seed: int = 0) -> list[tuple[str, bytes, dict]]:
    return [make_sample(seed, domain, i, image_size=SIZE) for i in range(n)]


def _write(out: Path, samples, **kw) -> dict:
    with ShardWriter(out, max_samples=kw.pop("max_samples", 4), **kw) as w:
        for s in samples:
            w.write(*s)
    return w.manifest


def test_roundtrip_through_webdataset(tmp_path: Path) -> None:
    samples = _samples(10)
    manifest = _write(tmp_path / "set", samples, extra={"generator": {"seed": 0}})
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == [
        "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

    ds = wds.WebDataset(shard_paths(tmp_path / "set"), shardshuffle=False).decode("pil")
    got = list(ds)
    assert [g["__key__"] for g in got] == [s[0] for s in samples]
    for g, (key, jpg, meta) in zip(got, samples):
        assert g["json"] == meta
        assert g["jpg"].size == (SIZE, SIZE) and g["jpg"].mode == "RGB"
    raw = list(wds.WebDataset(shard_paths(tmp_path / "set"), shardshuffle=False))
    assert [r["jpg"] for r in raw] == [s[1] for s in samples]  # bytes stored verbatim

    m = read_manifest(tmp_path / "set")
    assert m == json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert m["name"] == "set" and m["num_samples"] == 10 and m["generator"] == {"seed": 0}
    labels = [s[2]["label"] for s in samples]
    assert m["counts"]["label"] == {k: labels.count(k) for k in set(labels)}
    assert set(m["created_by"]) == {"command", "version", "time"}


def test_manifest_sha256_and_bytes_match_files(tmp_path: Path) -> None:
    import hashlib

    manifest = _write(tmp_path, _samples(6))
    for s in manifest["shards"]:
        data = (tmp_path / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        assert len(data) == s["bytes"]


def test_max_bytes_starts_new_shards(tmp_path: Path) -> None:
    samples = _samples(6)
    manifest = _write(tmp_path, samples, max_samples=100, max_bytes=3 * 6000)
    assert len(manifest["shards"]) > 1
    assert all(s["bytes"] <= 3 * 6000 or s["num_samples"] == 1 for s in manifest["shards"])
    assert manifest["num_samples"] == 6


def test_shard_appears_only_when_complete(tmp_path: Path) -> None:
    samples = _samples(5)
    w = ShardWriter(tmp_path, max_samples=2)
    w.write(*samples[0])
    w.write(*samples[1])
    assert not list(tmp_path.glob("*.tar"))  # still being written under .tmp
    assert [p.name for p in tmp_path.glob("*.tmp")] == ["shard-000000.tar.tmp"]
    w.write(*samples[2])  # rolls over: shard 0 is renamed into place, complete
    assert [p.name for p in tmp_path.glob("*.tar")] == ["shard-000000.tar"]
    assert len(list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False))) == 2
    assert not (tmp_path / "manifest.json").exists()
    w.close()
    assert not list(tmp_path.glob("*.tmp"))
    assert read_manifest(tmp_path)["num_samples"] == 3


def test_failure_inside_with_leaves_no_partial_shard_or_manifest(tmp_path: Path) -> None:
    samples = _samples(3)
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_samples=2) as w:
            for s in samples:
                w.write(*s)
            raise RuntimeError("boom")
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "manifest.json").exists()


def test_rejects_bad_samples_and_existing_sets(tmp_path: Path) -> None:
    key, jpg, meta = _samples(1)[0]
    with ShardWriter(tmp_path / "a") as w:
        w.write(key, jpg, meta)
        with pytest.raises(ValueError, match="duplicate"):
            w.write(key, jpg, meta)
        with pytest.raises(ValueError, match="key"):
            w.write("bad.key", jpg, meta)
        with pytest.raises(SchemaError, match="label"):
            w.write("other", jpg, {**meta, "label": "maybe"})
    with pytest.raises(FileExistsError, match=str(tmp_path / "a")):
        ShardWriter(tmp_path / "a")
    ShardWriter(tmp_path / "a", overwrite=True).close()
    assert read_manifest(tmp_path / "a")["num_samples"] == 0
    assert not list((tmp_path / "a").glob("*.tar"))


def test_same_seed_gives_identical_shards(tmp_path: Path) -> None:
    def shas(d: Path, seed: int) -> list[str]:
        generate_domain(d, "domain_b", 8, seed=seed, image_size=SIZE, samples_per_shard=3)
        return [s["sha256"] for s in read_manifest(d)["shards"]]

    first = shas(tmp_path / "one", 0)
    assert shas(tmp_path / "two", 0) == first
    assert shas(tmp_path / "three", 1) != first


def test_parallel_generation_is_identical(tmp_path: Path) -> None:
    generate_domain(tmp_path / "serial", "domain_c", 6, image_size=SIZE, samples_per_shard=4)
    generate_domain(tmp_path / "parallel", "domain_c", 6, image_size=SIZE, samples_per_shard=4, workers=2)
    assert [s["sha256"] for s in read_manifest(tmp_path / "serial")["shards"]] == \
        [s["sha256"] for s in read_manifest(tmp_path / "parallel")["shards"]]


def test_verify_passes_then_names_truncated_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path, _samples(6), max_samples=3)
    assert cli_main(["verify", str(tmp_path)]) == 0
    assert "OK" in capsys.readouterr().out

    victim = tmp_path / "shard-000001.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert cli_main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and str(victim) in out
    assert "shard-000000.tar" not in out  # the intact shard is not blamed


def test_verify_catches_corrupt_image_with_intact_sha(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key, jpg, meta = _samples(1)[0]
    _write(tmp_path, [(key, b"not a jpeg", meta)])
    assert cli_main(["verify", str(tmp_path)]) == 1
    assert "does not decode" in capsys.readouterr().out


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_manifest(missing)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x", "num_samples": 1, "shards": [], "counts": {}}))
    with pytest.raises(ManifestError, match="num_samples"):
        read_manifest(tmp_path)


def test_stats_and_verify_on_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write(tmp_path / "s", _samples(4))
    assert cli_main(["stats", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "label" in out and "attack" in out
    assert cli_main(["verify", str(tmp_path / "missing")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().out


def test_images_are_valid_jpeg(tmp_path: Path) -> None:
    for key, jpg, meta in _samples(3):
        with Image.open(io.BytesIO(jpg)) as im:
            assert im.format == "JPEG" and im.size == (SIZE, SIZE)
