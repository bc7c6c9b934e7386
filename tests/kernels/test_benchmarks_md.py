"""BENCHMARKS.md sections: replaced between their markers, appended when missing, text outside kept."""

from kernels.benchmarks_md import update_section


def test_section_is_appended_once_then_replaced_in_place(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(
        "# Benchmarks\n\n## Kernels\n\n<!-- kernels-bench:start -->\nold kernels\n<!-- kernels-bench:end -->\n"
        "hand-written note\n"
    )
    update_section(md, "trainer", "Trainer", "first run")
    update_section(md, "trainer", "Trainer", "second run")  # replaced, not appended twice
    update_section(md, "kernels", "Kernels", "new kernels")
    text = md.read_text()
    assert text.count("## Trainer") == 1 and text.count("## Kernels") == 1
    assert "second run" in text and "first run" not in text
    assert "new kernels" in text and "old kernels" not in text and "hand-written note" in text
    assert text.index("## Kernels") < text.index("hand-written note") < text.index("## Trainer")


def test_missing_file_is_created(tmp_path):
    md = tmp_path / "B.md"
    update_section(md, "kernels", "Kernels", "body")
    assert (
        md.read_text()
        == "# Benchmarks\n\n## Kernels\n\n<!-- kernels-bench:start -->\nbody\n<!-- kernels-bench:end -->\n"
    )
