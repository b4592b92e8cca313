"""The markdown-table checker used on every printed table (tests/_markdown.py) catches what would
not render."""

import pytest

from tests._markdown import markdown_tables


def test_checker_reads_tables_and_cells():
    text = "title\n\n| a | b |\n|---|---|\n| x | 1 |\n| y | 2 |\n\nnote\n| c |\n|:---:|\n| z |\n"
    first, second = markdown_tables(text)
    assert first.header == ["a", "b"] and first.cell("y", "b") == "2" and first.line == 3
    assert second.header == ["c"] and second.rows == [["z"]]


@pytest.mark.parametrize("text, message", [
    ("## Patient level\n\n|---|---|---|\n| max | 0.5 | 0.9 |\n", "no header row"),
    ("| a | b |\n| x | 1 |\n", "followed by a |---| row"),
    ("| a | b |\n|---|---|\n| x | 1 | 2 |\n", "3 cells, the header at line 1 has 2"),
    ("| a | b |\n|---|---|---|\n", "3 cells"),
])
def test_checker_rejects_tables_that_do_not_render(text, message):
    with pytest.raises(AssertionError, match=message.replace("|", r"\|")):
        markdown_tables(text)
