"""The one bounded JSON reader (issue 26.6): limits on size and nesting, one-line ValueErrors, exact results."""

from __future__ import annotations

import json

import pytest

from cnc.base import jsonio


@pytest.mark.parametrize("doc", [
    {"key": "a", "quality": {"removal": 0.5, "mask": [1, 2, {"x": None}]}},
    [[[[[[]]]]]],
    {"tricky": 'brackets [[[{{{ inside \\" strings ]]]}}}'},
    {"deep_but_allowed": json.loads("[" * 63 + "]" * 63)},  # 64 levels with the outer object
])
def test_parses_what_json_parses(doc):
    text = json.dumps(doc)
    assert jsonio.loads(text) == doc and jsonio.loads(text.encode()) == doc


def test_nesting_over_the_limit_is_a_value_error_not_a_recursion_error():
    deep = b"[" * 5000 + b"]" * 5000  # json.loads raises RecursionError on this
    with pytest.raises(jsonio.JSONLimitError, match="^sample json nests deeper than 64 levels$"):
        jsonio.loads(deep, what="sample json")
    assert isinstance(jsonio.JSONLimitError("x"), ValueError)  # every reader's per-sample `except ValueError`
    with pytest.raises(jsonio.JSONLimitError, match="nests deeper than 3 levels"):
        jsonio.loads('{"a": [[[1]]]}', max_depth=3)
    assert jsonio.loads('{"a": [[1]]}', max_depth=3) == {"a": [[1]]}


def test_brackets_inside_strings_do_not_count():
    doc = {"s": "[" * 200}
    assert jsonio.loads(json.dumps(doc), max_depth=2) == doc


def test_size_encoding_and_syntax_are_one_line_errors():
    with pytest.raises(jsonio.JSONLimitError, match="^marker has 11 bytes, over the 10-byte limit$"):
        jsonio.loads(b'{"a": "bc"}', what="marker", max_bytes=10)
    assert jsonio.loads(b'{"a": "b"}' + b" " * 100, max_bytes=None) == {"a": "b"}
    with pytest.raises(jsonio.JSONLimitError, match="^row is not UTF-8"):
        jsonio.loads(b"\xff{}", what="row")
    with pytest.raises(jsonio.JSONLimitError, match=r"^row is not valid JSON \(Expecting value at line 1 column 7\)$"):
        jsonio.loads('{"a": }', what="row")
