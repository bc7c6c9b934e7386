"""``ifas-shards stats`` reads only the manifest's counts, so it must say when the files no longer match
them: a missing, cut or unlisted shard, or an unfinished temporary file."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

from shards.cli import main
from shards.fixtures import face_image
from shards.writer import ShardWriter

META = {"label": "live", "attack": "none", "dataset": "t", "subject": "1", "video": "v", "caption": "c",
        "caption_source": "template"}


def _set(out: Path) -> Path:
    jpg = io.BytesIO()
    Image.fromarray(face_image()).save(jpg, format="JPEG")
    writer = ShardWriter(out, max_samples=2, max_bytes=1 << 30, overwrite=True)
    for i in range(6):
        writer.write(f"s{i}", jpg.getvalue(), META)
    writer.close()
    return out


def test_stats_says_when_the_files_do_not_match_the_manifest(tmp_path: Path, capsys) -> None:
    good = _set(tmp_path / "good")
    assert main(["stats", str(good)]) == 0
    out = capsys.readouterr().out
    assert "6 samples in 3 shards" in out and "DAMAGED" not in out

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    tars = sorted(bad.glob("*.tar"))
    tars[0].unlink()
    with open(tars[1], "r+b") as f:
        f.truncate(tars[1].stat().st_size // 2)
    shutil.copy(tars[2], bad / "extra.tar")
    (bad / "shard-000009.tar.tmp").write_bytes(b"half")
    assert main(["stats", str(good), str(bad)]) == 1
    out = capsys.readouterr().out
    damaged = out.split(str(bad) + ":", 1)[1]
    assert "DAMAGED: 4 problem(s)" in damaged and f"ifas-shards verify {bad}" in damaged
    assert f"{tars[0]}: listed in the manifest but missing" in damaged
    assert f"{tars[1]}: {tars[1].stat().st_size} bytes, manifest says" in damaged
    assert f"{bad / 'extra.tar'}: tar file not listed" in damaged
    assert "unfinished temporary file" in damaged
    assert "DAMAGED" not in out.split(str(bad) + ":", 1)[0]
