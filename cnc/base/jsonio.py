"""The one JSON reader for data the project did not write itself in this process: sample jsons in shards, markers,
error rows, manifests, caption files and table rows.

:func:`loads` parses with a size and a nesting-depth limit, so a hostile or broken document is a
:class:`JSONLimitError` (a ``ValueError``: every reader already reports it per sample or per file, in one line)
instead of a ``RecursionError`` deep inside the parser or in whatever walks the result later, or a parse of a huge
blob into memory. The depth check is one pass over the brackets, skipped when the document holds fewer brackets than
the limit (every normal sample json), so it costs nothing on the hot path of the trainer.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

#: Deepest nesting accepted (a sample json is 3 levels deep; markers and manifests 4).
MAX_DEPTH = 64
#: Largest document accepted by default (a sample json is a few KB; a marker with 100 failure reasons ~20 KB).
MAX_BYTES = 16 * 2**20


class JSONLimitError(ValueError):
    """A JSON document exceeds the size or nesting limit (or is not JSON at all); the message is one line."""


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether brackets nest deeper than ``max_depth`` outside strings (the document need not be valid JSON).
    Regular expressions and ``accumulate`` keep it at C speed: ~50 ns per bracket."""
    if text.count("[") + text.count("{") <= max_depth:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0) > max_depth


def loads(data: bytes | bytearray | str, *, what: str = "json", max_bytes: int | None = MAX_BYTES,
          max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)`` within limits.

    Args:
        data: the document (UTF-8 bytes or text).
        what: what the document is, the subject of the message (``"marker"``...; ``""``: the caller names it).
        max_bytes: size limit in bytes (``None``: none, for inputs that are big by nature such as COCO captions).
        max_depth: nesting limit.

    Raises:
        JSONLimitError: too big, too deep, not UTF-8 or not JSON (one line naming ``what`` and the limit).
    """
    size, subject = len(data), f"{what} " if what else ""
    if max_bytes is not None and size > max_bytes:
        raise JSONLimitError(f"{subject}has {size:,} bytes, over the {max_bytes:,}-byte limit")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONLimitError(f"{subject}is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        text = data
    if _depth_exceeds(text, max_depth):
        raise JSONLimitError(f"{subject}nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:  # unreachable after the depth check; kept as the last line of defence
        raise JSONLimitError(f"{subject}nests deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise JSONLimitError(f"{subject}is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
