"""slimjax.tables.Table: aligned text, HTML for notebooks, columns and rows by name."""

import pytest

from slimjax.tables import Table, human_bytes


def test_text_is_aligned_columns_with_notes_under_them():
    t = Table(("name", "bytes"), (("embed", 1024), ("blocks/attn/wq/kernel", 0.123456)), ("2 parameters",))
    lines = str(t).splitlines()
    assert lines[0] == "name                   bytes"
    assert lines[1] == "embed                  1024"
    assert lines[2] == "blocks/attn/wq/kernel  0.1235"  # floats to 4 significant digits
    assert lines[3] == "2 parameters"


def test_html_escapes_cells_and_columns_and_records_work_by_name():
    t = Table(("a<b", "c"), ((1, "<x>"), (2, "y")))
    html = t._repr_html_()
    assert "<th>a&lt;b</th>" in html and "<td>&lt;x&gt;</td>" in html and "<x>" not in html
    assert t.column("c") == ["<x>", "y"] and t.where("a<b", 2) == {"a<b": 2, "c": "y"} and len(t) == 2
    with pytest.raises(KeyError, match="no column 'd'; columns: a<b, c"):
        t.column("d")
    with pytest.raises(KeyError, match="no row"):
        t.where("c", "z")
    with pytest.raises(ValueError, match="row 0 has 1 values for 2 columns"):
        Table(("a", "b"), ((1,),))


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**20, "3 MiB"),
                                     (2.5 * 2**40, "2.5 TiB"), (2**50, "1.02e+03 TiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text
