"""shards.io: the project's one size parser, atomic writes and sha256."""
import hashlib

import pytest

from shards.io import atomic_write_text, parse_size, sha256_file


def test_parse_size_follows_the_hugging_face_convention():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(1000) == 1000
    assert parse_size("1.5 kb") == 1500 and parse_size("256MB") == 256 * 10**6 and parse_size("2G") == 2 * 10**9
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("5 parsecs")


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "latest"
    atomic_write_text(path, "step_1")
    atomic_write_text(path, "step_2")
    assert path.read_text() == "step_2" and [p.name for p in tmp_path.iterdir()] == ["latest"]
    assert sha256_file(path) == hashlib.sha256(b"step_2").hexdigest()
