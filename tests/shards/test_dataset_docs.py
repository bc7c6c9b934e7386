"""docs/datasets.md and the adapters say the same thing: each public dataset's section shows the
adapter's own layout, and every name it lists as released matches that documented pattern and is
accepted by the adapter's regular expressions (as an Item with a label, not ``unknown_naming``)."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest

from shards.adapters import ADAPTERS, get_adapter
from shards.fixtures import FIXTURES

DOC = Path(__file__).resolve().parents[2] / "docs" / "datasets.md"


def _sections() -> dict[str, str]:
    """adapter name -> its section of docs/datasets.md."""
    parts = re.split(r"^### .*\(`(\w+)`\)\s*$", DOC.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _glob_regex(pattern: str) -> str:
    """The docs' path notation as a regex: <field> one name part, {a,b} choices, [x|y/] optional,
    * any name, **/ any folders, a..b a numbered range."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "<":
            j = pattern.index(">", i)
            out, i = out + "[^/]+?", j + 1
        elif c in "{[":
            j = pattern.index("}" if c == "{" else "]", i)
            body = pattern[i + 1 : j]
            slash = "/" if c == "[" and body.endswith("/") else ""  # [train|test/]: a folder, or none
            choices = re.split(r"[,|]", body.removesuffix(slash))
            alt = "|".join(_glob_regex(x) if ".." not in x else r"[^/]+" for x in choices)
            out, i = out + f"(?:(?:{alt}){slash})" + ("?" if c == "[" else ""), j + 1
        else:
            out, i = out + re.escape(c), i + 1
    return out


def _documented_paths(layout: str) -> list[str]:
    """The path patterns of a layout line (it may add side files after ' + ' or ';', or a remark in
    parentheses); a pattern starting with '...' continues the folder of the one before."""
    layout = re.sub(r"\s*\((?:or (\S+)|[^)]*)\)", lambda m: f" or .../{m[1]}" if m[1] else "", layout)
    paths: list[str] = []
    for alt in re.split(r" \+ |; |, (?=root/)| or ", layout):
        if alt.startswith("root/"):
            paths.append(alt[len("root/") :])
        elif alt.startswith(".../") and paths:
            paths.append(paths[-1].rsplit("/", 1)[0] + "/" + alt[len(".../") :])
        elif alt.startswith(".") and paths:  # "(or .mp4)": same name, other extension
            paths.append(paths[-1].rsplit(".", 1)[0] + alt)
    return paths


PUBLIC = [n for n in ADAPTERS if n in FIXTURES]


@pytest.mark.parametrize("name", PUBLIC)
def test_documented_pattern_and_names_match_the_adapter(tmp_path: Path, name: str) -> None:
    section = _sections()[name]
    layout = re.search(r"```\n(.*?)\n```", section, flags=re.S)[1]
    assert layout == ADAPTERS[name].layout, f"docs/datasets.md shows another layout for {name}"
    names = re.findall(r"`([^`]+)`", re.search(r"Names as released, e\.g\. (.*)", section)[1])
    assert names, f"docs/datasets.md lists no released names for {name}"
    patterns = [re.compile(_glob_regex(p), re.I) for p in _documented_paths(layout)]
    adapter = get_adapter(name, str(tmp_path))
    for rel in names:
        assert any(p.fullmatch(rel) for p in patterns), f"{rel} does not match the documented {layout}"
        assert adapter.parse(PurePosixPath(rel)) is not None, f"{name} adapter rejects the documented {rel}"


def test_siw_sensor2_live_videos_named_dot_m_are_kept() -> None:
    """SiW's release names 16 live test videos NNN-2-1-M-S.m.mov; they are live test samples."""
    adapter = get_adapter("siw", str(DOC.parent))
    for subject in (153, 154, 158, 161):
        fields = adapter.parse(PurePosixPath(f"Test/live/{subject}/{subject}-2-1-1-1.m.mov"))
        assert fields is not None
        assert (fields["attack"], fields["split"], fields["subject"], fields["device"]) == (
            "none", "test", str(subject), "sensor2")
    assert adapter.parse(PurePosixPath("Test/live/153/153-2-1-1-1.x.mov")) is None
