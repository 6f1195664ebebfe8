"""The sample format: keys, depth quantisation, and the bit-exact encode/decode round trip."""

import io
import json

import numpy as np
import pytest

from triplets.sample import (
    FIELDS,
    KEY_PATTERN,
    REQUIRED_META,
    TripletSample,
    decode_sample,
    depth_to_float,
    encode_sample,
    make_key,
    quantize_depth,
    validate_sample,
)


def _sample(key="img_001", r=24, d=8, seed=0) -> TripletSample:
    rng = np.random.default_rng(seed)
    raw_fg, raw_bg = rng.normal(5, 2, (r, r)), rng.normal(-1, 0.3, (r, r))
    fq, fr = quantize_depth(raw_fg)
    bq, br = quantize_depth(raw_bg)
    meta = {k: None for k in REQUIRED_META}
    meta.update(key=key, fg_depth_range=list(fr), bg_depth_range=list(br), timings={}, models={"a": 1})
    return TripletSample(
        key=key, image=rng.integers(0, 256, (r, r, 3), dtype=np.uint8), mask=(rng.random((r, r)) > 0.5).astype(np.uint8),
        background=rng.integers(0, 256, (r, r, 3), dtype=np.uint8), fg_depth=fq, bg_depth=bq,
        fg_emb=rng.normal(size=d).astype(np.float32), bg_emb=rng.normal(size=d).astype(np.float32),
        caption="a caption: with colon, ünïcode ✓", meta=meta)


def test_round_trip_is_bit_exact_for_masks_depths_embeddings_and_text():
    s = _sample()
    raw = encode_sample(s)
    assert set(raw) == {"__key__", *FIELDS}
    d = decode_sample(raw)
    assert d.key == s.key and d.caption == s.caption and d.meta == s.meta
    assert d.mask.dtype == np.uint8 and np.array_equal(d.mask, s.mask)
    assert d.fg_depth.dtype == np.uint16 and np.array_equal(d.fg_depth, s.fg_depth)
    assert np.array_equal(d.bg_depth, s.bg_depth)
    assert d.fg_emb.dtype == np.float32 and np.array_equal(d.fg_emb, s.fg_emb)
    assert np.array_equal(d.bg_emb, s.bg_emb)
    assert d.image.shape == s.image.shape and d.background.dtype == np.uint8
    # a second encode of the decoded sample gives the same lossless fields
    again = encode_sample(d)
    for f in ("mask.png", "fg_depth.png", "bg_depth.png", "fg_emb.npy", "txt", "json"):
        assert again[f] == raw[f]


def test_stored_mask_is_0_255_and_depth_16_bit():
    from PIL import Image

    raw = encode_sample(_sample())
    m = np.asarray(Image.open(io.BytesIO(raw["mask.png"])))
    assert set(np.unique(m)) <= {0, 255}
    depth = Image.open(io.BytesIO(raw["fg_depth.png"]))
    assert depth.mode.startswith("I;16") or depth.mode == "I"
    assert np.asarray(depth).max() == 65535


def test_decode_accepts_dotted_keys_from_webdataset_and_names_missing_fields():
    raw = encode_sample(_sample())
    dotted = {("." + k if k != "__key__" else k): v for k, v in raw.items()}
    assert decode_sample(dotted).key == "img_001"
    del raw["bg_depth.png"]
    with pytest.raises(KeyError, match="bg_depth.png"):
        decode_sample(raw)


def test_depth_quantisation_keeps_raw_range_recoverable():
    raw = np.linspace(-3.5, 12.25, 400).reshape(20, 20)
    q, (lo, hi) = quantize_depth(raw)
    assert q.dtype == np.uint16 and q.min() == 0 and q.max() == 65535
    assert (lo, hi) == (-3.5, 12.25)
    back = depth_to_float(q, (lo, hi))
    assert np.abs(back - raw).max() <= (hi - lo) / 65535
    assert np.array_equal(quantize_depth(np.full((4, 4), 2.0))[0], np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError):
        quantize_depth(np.array([[np.nan, 1.0]]))


def test_validate_and_encode_reject_malformed_samples():
    s = _sample()
    s.mask = s.mask * 255  # not {0,1}
    assert any("mask" in p for p in validate_sample(s))
    with pytest.raises(ValueError, match="malformed"):
        encode_sample(s)
    s = _sample()
    s.fg_depth = s.fg_depth.astype(np.float32)
    assert any("fg_depth" in p for p in validate_sample(s))
    s = _sample(key="bad.key")
    assert any("dot-free" in p for p in validate_sample(s))
    s = _sample()
    del s.meta["seed"]
    assert any("seed" in p for p in validate_sample(s))


@pytest.mark.parametrize("source, expected", [
    ("dogs/001.jpg", "dogs/001"),
    ("000000391895", "000000391895"),
    ("plain_name-1.png", "plain_name-1"),
])
def test_keys_are_stable_and_untouched_when_clean(source, expected):
    assert make_key(source) == expected


def test_keys_are_dot_free_and_distinct_after_cleaning():
    keys = [make_key(s) for s in ("22.05.2024.png", "22_05.2024.png", "café au lait.jpg", "_hidden.jpg",
                                  "a b/c.d.jpg", "x..y.jpg")]
    assert all(KEY_PATTERN.match(k) for k in keys)
    assert len(set(keys)) == len(keys)
    assert not any(k.startswith("_") for k in keys)
    assert make_key("22.05.2024.png") == make_key("22.05.2024.png")


def test_json_is_canonical():
    raw = encode_sample(_sample())
    meta = json.loads(raw["json"])
    assert list(meta) == sorted(meta)


# -- the one field table ------------------------------------------------------------------------------------------
def test_every_member_is_in_the_field_table_and_round_trips_through_it():
    """encode_sample writes exactly the table's members (latent.npy only when set) and each field's decoder gives
    the attribute back."""
    from triplets.sample import LATENT_FIELD, SAMPLE_FIELDS

    s = _sample()
    s.latent = np.zeros((2, 4, 3, 3), np.float16)
    raw = encode_sample(s)
    assert set(raw) - {"__key__"} == {f.suffix for f in SAMPLE_FIELDS}
    assert [f.suffix for f in SAMPLE_FIELDS if not f.required] == [LATENT_FIELD]
    assert set(FIELDS) == {f.suffix for f in SAMPLE_FIELDS if f.required}
    for f in SAMPLE_FIELDS:
        decoded, want = f.decode(raw[f.suffix]), getattr(s, f.attr)
        if isinstance(want, np.ndarray) and f.suffix not in ("jpg", "bg.jpg"):  # JPEG is lossy
            assert decoded.dtype == want.dtype and np.array_equal(decoded, want), f.suffix
        elif not isinstance(want, np.ndarray):
            assert decoded == want, f.suffix


def test_a_field_that_does_not_decode_is_named():
    from triplets.image_io import encode_png

    raw = encode_sample(_sample())
    raw["fg_depth.png"] = encode_png(np.zeros((24, 24), np.uint8))
    with pytest.raises(ValueError, match="fg_depth.png must be a 16-bit PNG, got uint8"):
        decode_sample(raw)


def test_stock_decoder_card_and_readme_are_the_field_table():
    """triplets.wds's decoder, the dataset card's columns and the README's table are derived from (or checked
    against) SAMPLE_FIELDS: a field added, removed or reworded in one place fails here."""
    import triplets.wds
    from tests.support import REPO
    from triplets.card import FIELDS as CARD_FIELDS
    from triplets.card import render_card
    from triplets.sample import SAMPLE_FIELDS, fields_markdown

    raw = encode_sample(_sample())
    decoded = triplets.wds.decode(raw)
    assert set(triplets.wds.FIELD_DECODERS) == {f.suffix for f in SAMPLE_FIELDS}
    for f in SAMPLE_FIELDS:
        if f.suffix in raw:
            want = f.decode(raw[f.suffix])
            assert (np.array_equal(decoded[f.suffix], want) if isinstance(want, np.ndarray)
                    else decoded[f.suffix] == want), f.suffix
    assert [k for k in CARD_FIELDS if not k.startswith("__")] == [f.suffix for f in SAMPLE_FIELDS]
    card = render_card({"name": "x"})
    assert all(f"| `{f.suffix}` | {f.feature} | {f.content}" in card for f in SAMPLE_FIELDS)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert fields_markdown() in readme, "README's sample-format table differs from triplets.sample.SAMPLE_FIELDS " \
                                        "(paste triplets.sample.fields_markdown())"
