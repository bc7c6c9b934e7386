"""Images are read as a person sees them on every path (shards/io.py open_image): the shard builder's
reader, the trainer's sample decoder, prediction and ``ifas-shards verify``; and every path accepts
the same image members (shards/schema.py)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shards.cli import main as shards_main
from shards.cli import verify_shard_set
from shards.fixtures import face_image
from shards.io import open_image
from shards.video import read_image
from shards.writer import ShardWriter
from trainer.data import BadSample, decode_sample
from trainer.eval.predict import iter_inputs

META = {"label": "live", "attack": "none", "dataset": "t", "subject": "1", "video": "v", "caption": "c",
        "caption_source": "template"}


def _phone_photo(path: Path, fmt: str) -> np.ndarray:
    """A photo stored as the sensor saw it (landscape) with EXIF orientation 6 ("rotate 90 clockwise
    to view"); returns what a person sees: the stored pixels turned clockwise."""
    stored = np.asarray(Image.fromarray(face_image(80)).resize((96, 64)))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(path, format=fmt, exif=exif, **({"quality": 98} if fmt == "JPEG" else {}))
    return np.rot90(stored, k=-1)


def _readers(path: Path) -> dict[str, np.ndarray]:
    """The same file through every reader of the project."""
    (item,) = iter_inputs([str(path)])
    raw = {"__key__": "k", "__url__": "u", path.suffix.lstrip(".").lower(): path.read_bytes(),
           "json": json.dumps(META).encode()}
    return {
        "open_image": np.asarray(open_image(path)),
        "shard build (read_image)": read_image(path),
        "training (decode_sample)": np.asarray(decode_sample(raw)[0]),
        "ifas-predict": np.asarray(item.image),
    }


@pytest.mark.parametrize("fmt,suffix,tol", [("JPEG", ".jpg", 6.0), ("PNG", ".png", 0.0)])
def test_exif_orientation_is_applied_everywhere(tmp_path: Path, fmt: str, suffix: str, tol: float) -> None:
    upright = _phone_photo(tmp_path / f"phone{suffix}", fmt)
    for reader, rgb in _readers(tmp_path / f"phone{suffix}").items():
        assert rgb.shape == upright.shape == (96, 64, 3), f"{reader} reads the photo sideways"
        assert np.abs(rgb.astype(float) - upright).mean() <= tol, reader


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")  # really 16-bit on disk
    expected = np.round(levels / 257.0)
    for reader, rgb in _readers(tmp_path / "depth.png").items():
        assert rgb.dtype == np.uint8 and rgb.shape == (48, 64, 3), reader
        assert np.abs(rgb[..., 0].astype(float) - expected).max() <= 1, f"{reader} clips 16-bit grey"
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_alpha_and_palette_transparency_composite_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:10, :, :] = (200, 10, 10, 255)  # opaque red top; transparent black bottom
    rgba[10:, :10, 3] = 128  # half-transparent black: half way to white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    palette = Image.fromarray(rgba[..., :3]).quantize(colors=4)
    palette.info["transparency"] = palette.getpixel((15, 15))
    palette.save(tmp_path / "palette.png", transparency=palette.info["transparency"])
    for name in ("alpha.png", "palette.png"):
        for reader, rgb in _readers(tmp_path / name).items():
            assert tuple(rgb[0, 0]) == (200, 10, 10), f"{reader} {name}"
            assert tuple(rgb[15, 15]) == (255, 255, 255), f"{reader} {name}: transparency is not white"
    half = np.asarray(open_image(tmp_path / "alpha.png"))[15, 5]
    assert abs(int(half[0]) - 127) <= 1


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _rewrite(shard_dir: Path, samples: list[dict]) -> None:
    """Replace the set's one shard with ``samples`` and refresh its manifest's size and checksum."""
    from shards.io import sha256_file

    tar = next(shard_dir.glob("*.tar"))
    with wds.TarWriter(str(tar)) as sink:
        for s in samples:
            sink.write(s)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["shards"][0].update(bytes=tar.stat().st_size, sha256=sha256_file(tar))
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))


def test_one_schema_of_image_members_for_verify_and_the_loader(tmp_path: Path, capsys) -> None:
    """A .png member is a valid image member for verify as for the loader; none, or two, is refused by both."""
    writer = ShardWriter(tmp_path / "set", max_samples=100, max_bytes=1 << 30, overwrite=True)
    jpg = io.BytesIO()
    Image.fromarray(face_image()).save(jpg, format="JPEG")
    for i in range(3):
        writer.write(f"s{i}", jpg.getvalue(), META)
    writer.close()
    meta = json.dumps(META).encode()
    png = {"__key__": "s0", "png": _png(face_image()), "json": meta}
    _rewrite(tmp_path / "set", [png, {"__key__": "s1", "jpg": jpg.getvalue(), "json": meta},
                                {"__key__": "s2", "jpg": jpg.getvalue(), "json": meta}])
    assert verify_shard_set(tmp_path / "set")[0] == []
    assert np.asarray(decode_sample(png | {"__url__": "u"})[0]).shape == (80, 80, 3)

    both = {"__key__": "s1", "jpg": jpg.getvalue(), "png": png["png"], "json": meta}
    none = {"__key__": "s2", "json": meta}
    _rewrite(tmp_path / "set", [png, both, none])
    problems, _ = verify_shard_set(tmp_path / "set")
    assert any("s1: 2 image members (jpg, png)" in p for p in problems)
    assert any("s2: no image member" in p for p in problems)
    for raw in (both, none):
        with pytest.raises(BadSample) as err:
            decode_sample(raw | {"__url__": "u"})
        assert err.value.reason == "missing_member"
    assert shards_main(["verify", str(tmp_path / "set")]) == 1
    assert "FAIL" in capsys.readouterr().out
