"""ifas-predict over files, folders and shard sets: JSONL with one line per input."""
from __future__ import annotations

import io
import json

import pytest
import webdataset as wds
from PIL import Image


@pytest.fixture(scope="module")
def inputs(small_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    shard = small_shards["domain_d"] / "shard-000000.tar"
    images = []
    for i, sample in enumerate(wds.WebDataset(str(shard), shardshuffle=False)):
        if i == 4:
            break
        images.append(Image.open(io.BytesIO(sample["jpg"])))
    files = [root / "face0.png", root / "face1.jpg"]
    for path, image in zip(files, images):
        image.save(path)
    folder = root / "folder"
    (folder / "nested").mkdir(parents=True)
    images[2].save(folder / "b.png")
    images[3].save(folder / "nested" / "a.jpeg")
    (folder / "notes.txt").write_text("not an image")
    return {"files": files, "folder": folder, "shard": shard}


def test_jsonl_has_one_line_per_input(tiny_model_dir, inputs, tmp_path, capsys):
    from trainer.cli.predict import main

    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"threshold": 0.51, "source": "test"}))
    out = tmp_path / "pred.jsonl"
    args = ["--model", str(tiny_model_dir), "--threshold-from", str(cal), "--max-new-tokens", "4", "--batch-size", "5",
            "--out", str(out), "--jsonl", *map(str, inputs["files"]), str(inputs["folder"]), str(inputs["shard"])]
    assert main(args) == 0
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    printed = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert lines == printed
    assert len(lines) == 2 + 2 + 16  # 2 files, 2 images in the folder (the .txt is not one), a 16-sample shard
    assert [ln["path"] for ln in lines[:4]] == [*map(str, inputs["files"]), str(inputs["folder"] / "b.png"),
                                                 str(inputs["folder"] / "nested" / "a.jpeg")]
    for ln in lines:
        assert {"path", "judgment", "score", "threshold", "threshold_source", "explanation"} <= set(ln)
        assert ln["threshold"] == 0.51 and ln["judgment"] == ("Yes" if ln["score"] >= 0.51 else "No")
        assert 0.0 <= ln["score"] <= 1.0 and isinstance(ln["explanation"], str)
    shard_lines = lines[4:]
    assert all(ln["path"].startswith(str(inputs["shard"]) + "#") for ln in shard_lines)
    assert {ln["label"] for ln in shard_lines} == {"live", "spoof"} and "attack" in shard_lines[0]


def test_explanation_follows_the_judgment(tiny_model_dir, inputs):
    from trainer.eval.predict import predict
    from trainer.model.ifas import IFASModel

    model, tok = IFASModel.from_pretrained(tiny_model_dir)
    model.eval()
    yes = predict(model, tok, inputs["files"], threshold=0.0, max_new_tokens=3)
    no = predict(model, tok, inputs["files"], threshold=1.01, explain=False)
    assert [r["judgment"] for r in yes] == ["Yes", "Yes"] and [r["judgment"] for r in no] == ["No", "No"]
    assert [r["score"] for r in yes] == pytest.approx([r["score"] for r in no])
    assert all(r["explanation"] == "" for r in no)


def test_face_crop_of_a_raw_photo(tiny_model_dir, tmp_path, capsys):
    from skimage import data

    from trainer.cli.predict import main
    from trainer.eval.predict import crop_face

    photo = Image.fromarray(data.astronaut())  # 512 x 512, face near the top centre-right
    crop, box = crop_face(photo, 128)
    assert box is not None and crop.size == (128, 128)
    x, y, w, h = box
    assert 0.2 < x < 0.6 and 0.0 < y < 0.4 and 0.1 < w < 0.5 and 0.1 < h < 0.5
    blank, none = crop_face(Image.new("RGB", (200, 200), "grey"), 128)
    assert none is None and blank.size == (200, 200)
    photo.save(tmp_path / "astronaut.png")
    assert main(["--model", str(tiny_model_dir), "--face-crop", "--no-explain", "--jsonl",
                 str(tmp_path / "astronaut.png")]) == 0
    (line,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert line["face_box"] == box


def test_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    from trainer.cli.predict import main

    assert main(["--model", str(tiny_model_dir), str(tmp_path / "missing.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jpg does not exist" in err[0]
    (tmp_path / "x.png").write_bytes(b"not a png")
    assert main(["--model", str(tiny_model_dir), "--no-explain", str(tmp_path / "x.png")]) == 1
    captured = capsys.readouterr()
    assert "x.png: unreadable: not a readable image" in captured.out
    assert "ifas-predict: error: no input could be predicted" in captured.err
    (tmp_path / "bad.json").write_text(json.dumps({"a": {"eer_threshold": 0.5}, "b": {"eer_threshold": 0.6}}))
    assert main(["--model", str(tiny_model_dir), "--threshold-from", str(tmp_path / "bad.json"),
                 str(tmp_path / "x.png")]) == 2
    assert "--dev-shards" in capsys.readouterr().err


def test_every_readable_input_is_predicted_and_each_unreadable_one_reported(tiny_model_dir, inputs, tmp_path,
                                                                             capsys):
    """A folder with a zero-byte .jpg and a text file named .jpg between good photos, a missing path and a
    shard set with one undecodable sample and one garbage tar: the good ones are all predicted, in order,
    and every bad one is its own error record; the exit status is 0 unless --strict."""
    from trainer.cli.predict import main

    folder = tmp_path / "photos"
    folder.mkdir()
    good = Image.open(inputs["files"][1])
    good.save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"")
    (folder / "c.jpg").write_text("this is a text file")
    good.save(folder / "d.jpg")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    samples = list(wds.WebDataset(str(inputs["shard"]), shardshuffle=False))[:3]
    with wds.TarWriter(str(damaged / "shard-000000.tar")) as sink:
        for i, s in enumerate(samples):
            sink.write({"__key__": s["__key__"], "jpg": b"\xff\xd8 cut" if i == 1 else s["jpg"], "json": s["json"]})
    (damaged / "shard-000001.tar").write_bytes(b"garbage, not a tar" * 40)
    args = ["--model", str(tiny_model_dir), "--no-explain", "--batch-size", "2", "--jsonl",
            str(inputs["files"][0]), str(folder), str(tmp_path / "missing.png"), str(damaged)]
    assert main(args) == 0
    captured = capsys.readouterr()
    records = [json.loads(ln) for ln in captured.out.splitlines()]
    keys = [s["__key__"] for s in samples]
    shard0 = str(damaged / "shard-000000.tar")
    assert [r["path"] for r in records] == [
        str(inputs["files"][0]), *(str(folder / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")),
        str(tmp_path / "missing.png"), *(f"{shard0}#{k}" for k in keys), str(damaged / "shard-000001.tar")]
    errors = [r for r in records if "error" in r]
    assert [r["path"] for r in errors] == [str(folder / "b.jpg"), str(folder / "c.jpg"), str(tmp_path / "missing.png"),
                                           f"{shard0}#{keys[1]}", str(damaged / "shard-000001.tar")]
    assert "does not exist" in errors[2]["error"] and errors[3]["error"].startswith("bad_image")
    assert all("judgment" in r for r in records if "error" not in r)
    assert "5 predicted, 5 unreadable" in captured.err
    assert main(["--strict", *args]) == 1
