"""The COCO "first caption" rule, stated precisely (issue 14, item 6).

The reader follows the reference rule (``data/parse_cocostuff.py``): the **first annotation in file order** for the
image, whatever the annotation ids; only ``\\n`` and ``\\r`` are replaced by a space (runs and ends kept).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from triplets.readers import read_items


def _coco(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "train2017").mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
    (tmp_path / "train2017" / "000000000009.jpg").write_bytes(buf.getvalue())
    ann = {"images": [{"id": 9, "file_name": "000000000009.jpg"}],
           "annotations": [{"id": 40, "image_id": 9, "caption": "listed first,\nhigher id "},
                           {"id": 12, "image_id": 9, "caption": " lowest  id\ncaption"},
                           {"id": 25, "image_id": 9, "caption": "middle id"}]}
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(ann))
    return str(path)


def test_reference_rule_first_in_file_order(tmp_path):
    (item,) = read_items(_coco(tmp_path))
    assert item["caption"] == "listed first, higher id "
