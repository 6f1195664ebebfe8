"""Issue 15 (GPU efficiency) on CPU: batched SAM equals the per-image predictor, reduced precision stays within a
stated tolerance, per-stage batch sizes do not change outputs, the parallel writer keeps tars byte-identical."""

import numpy as np
import pytest
import torch

from cnc.tiny import synthetic_photo, tiny_dpt, tiny_sam
from triplets.stages.sam_batch import BatchedSam

R = 64


def _images(n: int, r: int = R) -> np.ndarray:
    return np.stack([synthetic_photo(i, r, r) for i in range(n)])


def _prompts(n: int, r: int = R):
    rng = np.random.default_rng(0)
    lo = rng.integers(2, r // 3, (n, 2))
    hi = lo + rng.integers(r // 4, r // 2, (n, 2))
    boxes = np.concatenate([lo, hi], 1).astype(np.float32)
    points = ((lo + hi) / 2).astype(np.float32)
    return boxes, points


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_batched_sam_matches_predictor_fp32():
    """fp32 on CPU: the batched path gives the predictor's candidates and scores (within float rounding)."""
    from segment_anything import SamPredictor

    images = _images(3)
    boxes, points = _prompts(3)
    masks, scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    assert masks.shape == (3, 3, R, R) and masks.dtype == bool and scores.shape == (3, 3)
    predictor = SamPredictor(tiny_sam().eval())
    for i in range(3):
        with torch.inference_mode():
            predictor.set_image(images[i])
            ref, ref_scores, _ = predictor.predict(point_coords=points[i:i + 1], point_labels=np.array([1]),
                                                   box=boxes[i], multimask_output=True)
        np.testing.assert_allclose(scores[i], ref_scores, rtol=1e-4, atol=1e-5)
        assert np.mean(masks[i] != ref) < 1e-3  # only pixels whose logit is ~0 may flip


def test_batched_sam_rows_do_not_depend_on_neighbours():
    images = _images(4)
    boxes, points = _prompts(4)
    sam = BatchedSam(tiny_sam(), "cpu", torch.float32)
    full, full_scores = sam(images, boxes, points)
    alone, alone_scores = sam(images[2:3], boxes[2:3], points[2:3])
    np.testing.assert_allclose(full_scores[2], alone_scores[0], rtol=1e-4, atol=1e-5)
    assert np.mean(full[2] != alone[0]) < 1e-3


#: Stated tolerance of reduced precision (bf16 autocast) vs fp32 on the tiny models: every SAM candidate mask keeps an
#: IoU ≥ 0.95 with its fp32 counterpart, its predicted IoU score is within 0.05, and the DPT disparity (min-max
#: normalised per map) is within 0.03 of the fp32 one on average (max 0.1).
MASK_IOU_MIN, SCORE_ATOL, DEPTH_MEAN_ATOL, DEPTH_MAX_ATOL = 0.95, 0.05, 0.03, 0.1


def test_sam_bf16_autocast_within_tolerance():
    images = _images(4)
    boxes, points = _prompts(4)
    ref_masks, ref_scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    masks, scores = BatchedSam(tiny_sam(), "cpu", torch.bfloat16)(images, boxes, points)
    ious = [_iou(masks[i, j], ref_masks[i, j]) for i in range(4) for j in range(3)]
    assert min(ious) >= MASK_IOU_MIN, ious
    assert np.abs(scores - ref_scores).max() <= SCORE_ATOL
    assert not np.array_equal(scores, ref_scores)  # the reduced precision really ran


def test_depth_bf16_within_tolerance():
    model, processor = tiny_dpt()
    pixels = processor(images=list(_images(4)), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ref = model(pixel_values=pixels).predicted_depth.float()
        low = model.to(torch.bfloat16)(pixel_values=pixels.to(torch.bfloat16)).predicted_depth.float()

    def norm(x):
        lo, hi = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
        return (x - lo) / (hi - lo)

    diff = (norm(low) - norm(ref)).abs()
    assert diff.mean() <= DEPTH_MEAN_ATOL and diff.max() <= DEPTH_MAX_ATOL, (diff.mean(), diff.max())
    assert diff.max() > 0


def test_sdpa_attention_equals_library_attention():
    from triplets.stages.sam_batch import use_sdpa_attention

    x = torch.as_tensor(_images(2)).permute(0, 3, 1, 2).float()
    ref_sam, sdpa_sam = tiny_sam(), tiny_sam()
    torch.nn.init.normal_(ref_sam.image_encoder.blocks[0].attn.rel_pos_h, std=0.5)
    sdpa_sam.load_state_dict(ref_sam.state_dict())
    assert use_sdpa_attention(sdpa_sam) == 1
    with torch.inference_mode():
        pixels = torch.cat([ref_sam.preprocess(t[None]) for t in x])
        torch.testing.assert_close(sdpa_sam.image_encoder(pixels), ref_sam.image_encoder(pixels), rtol=1e-4, atol=1e-5)


def _reference_inpaint(stage, images, masks, keys):
    """The per-image-encoding path the stage replaced: PIL inputs, prompts as text, diffusers' own list handling."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from triplets.stages.inpaint import dilate_mask, sample_seed

    pipe = StableDiffusionInpaintPipeline(**stage.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    r = images.shape[1]
    dilated = np.stack([dilate_mask(m, stage.dilation_px, r) for m in masks])
    gens = [torch.Generator("cpu").manual_seed(sample_seed(stage.base_seed, k)) for k in keys]
    with torch.inference_mode():
        out = pipe(prompt=[stage.prompt] * len(keys), negative_prompt=[stage.negative_prompt] * len(keys),
                   image=[Image.fromarray(im) for im in images], mask_image=[Image.fromarray(d * 255) for d in dilated],
                   height=r, width=r, strength=stage.strength, guidance_scale=stage.guidance,
                   num_inference_steps=stage.steps, generator=gens, output_type="np").images
    bg = np.clip(np.round(np.asarray(out, np.float32) * 255), 0, 255).astype(np.uint8)
    return np.where(dilated[..., None] > 0, bg, images)


@pytest.fixture(scope="module")
def inpaint_stage():
    from cnc.hub import TINY, resolve_pretrained
    from triplets.stages.inpaint import InpaintStage

    return InpaintStage(resolve_pretrained(TINY, "inpaint.model"), num_inference_steps=2, device="cpu")


def _masks(n: int, r: int = R) -> np.ndarray:
    yy, xx = np.mgrid[0:r, 0:r]
    return np.stack([((yy - r / 2) ** 2 + (xx - r / 2 - i) ** 2 < (r / 5) ** 2).astype(np.uint8) for i in range(n)])


def test_inpaint_equals_per_image_path_and_ignores_neighbours(inpaint_stage):
    """Prompt embeddings once, one VAE call for the batch, tensor pre/post-processing: the backgrounds of the
    per-image-encoding path (within fp32 rounding), and a row alone gets what it gets within a batch."""
    images, masks, keys = _images(2), _masks(2), np.array(["a", "b"], dtype=object)
    got = inpaint_stage.process({"image": images, "mask": masks, "key": keys})[0]["background"]
    ref = _reference_inpaint(inpaint_stage, images, masks, keys)
    assert got.dtype == np.uint8 and got.shape == images.shape
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # fp32 rounding of the batched VAE encode at most
    assert np.mean(got != ref) < 0.01
    alone = inpaint_stage.process({"image": images[1:], "mask": masks[1:], "key": keys[1:]})[0]["background"]
    assert np.abs(got[1].astype(int) - alone[0].astype(int)).max() <= 1


def test_sam_device_resize_within_tolerance():
    """The tensor resize used off the CPU (antialiased bilinear) vs the predictor's PIL resize: same masks within
    the stated tolerance."""
    images = _images(3)
    boxes, points = _prompts(3)
    ref_masks, ref_scores = BatchedSam(tiny_sam(), "cpu", torch.float32)(images, boxes, points)
    masks, scores = BatchedSam(tiny_sam(), "cpu", torch.float32, device_resize=True)(images, boxes, points)
    assert min(_iou(masks[i, j], ref_masks[i, j]) for i in range(3) for j in range(3)) >= MASK_IOU_MIN
    assert np.abs(scores - ref_scores).max() <= SCORE_ATOL


def test_parallel_encodes_keep_tar_bytes(tmp_path):
    """The worker's writer encodes on ``ray.encode_threads`` threads; the tar is byte-identical to one thread's."""
    from PIL import Image

    from cnc.config import load_config
    from cnc.tiny import synthetic_photo as photo
    from pipelines.worker import ShardWorker
    from triplets.builder import resolve_models
    from triplets.config import BuildConfig
    from triplets.readers import read_items

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(i, 80, 96)).save(src / f"p{i}.jpg", quality=92)
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml", [
        f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=1", "batch_size=2", "inpaint.batch_size=1",
        "quality.enabled=false", "ray.encode_threads=1"])
    worker = ShardWorker(cfg.model_dump(mode="json"), resolve_models(cfg), "test")
    assert [s.batch_size for s in worker.builder.model_stages] == [2, 1, 2, 2]
    spec = {"shard": 0, "name": "000000", "items": read_items(str(src))}
    one = worker.build_shard(spec, output=str(tmp_path / "one"))
    worker.cfg.ray.encode_threads = 4
    four = worker.build_shard(spec, output=str(tmp_path / "four"))
    assert one.nsamples == four.nsamples == 3
    assert (tmp_path / "one" / "000000.tar").read_bytes() == (tmp_path / "four" / "000000.tar").read_bytes()


def test_gpu_suite_tiny_path(tmp_path):
    """``benchmarks/gpu_suite.py --tiny`` runs the reference and the project setting on the same work."""
    import json
    import subprocess
    import sys

    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--images", "3", "--resolution",
                           str(R), "--steps", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ref, project = result["runs"]
    assert ref["run"].startswith("reference") and project["run"].startswith("project")
    assert ref["stage_rows"] == project["stage_rows"]  # the same work in every run
    assert ref["stage_rows"]["segment"]["attempted"] == 3 and ref["triplets"] == project["triplets"]
    assert project["ratio_to_reference"] > 0 and 0 < project["mfu"] < 1
    assert set(project["cpu_ms_per_item"]) >= {"segment", "inpaint", "depth", "embed"}
    assert "| reference: fp32, batch 1, stage-major |" in proc.stdout


def test_training_and_loader_benchmarks_run_on_cpu(tmp_path):
    """The other two issue-15 benchmarks keep running (tiny/CPU paths; their GPU runs are `benchmarks/gpu_all.sh`)."""
    import json
    import subprocess
    import sys

    rows = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--size", "tiny", "--steps", "1",
                           "--warmup", "0", "--batch", "2", "--settings", "project-latents", "--json", str(rows)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "| tiny | project-latents" in proc.stdout, proc.stderr[-3000:]
    (row,) = json.loads(rows.read_text())
    assert row["setting"] == "project-latents" and row["images_per_s"] > 0 and row["peak_gb"] > 0

    loader = tmp_path / "loader.json"
    proc = subprocess.run([sys.executable, "benchmarks/loader_transfer.py", "--resolution", str(R), "--samples", "8",
                           "--batch", "2", "--batches", "2", "--workers", "0", "--json", str(loader)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    floats, compact = json.loads(loader.read_text())
    assert not floats["compact"] and compact["compact"]
    assert compact["bytes_per_sample"] * 4 < floats["bytes_per_sample"]  # 512²: 2.1 vs 10.5 MB


def test_latents_build_output_and_trainer_sampling(tmp_path):
    """latents.enabled stores the VAE distribution of I (fp16, round-trips through the tar); the trainer's
    data.use_latents draws from it exactly as ``latent_dist.sample()`` draws; shards without it are refused."""
    from types import SimpleNamespace

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    from cnc.config import load_config
    from cnc_model.data import TrainingDataError, collate, sample_latents, sample_to_tensors
    from cnc_model.training.trainer import Trainer
    from triplets.builder import TripletBuilder
    from triplets.config import BuildConfig
    from triplets.readers import read_items
    from triplets.sample import decode_sample, encode_sample

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_photo(i, 80, 96)).save(src / f"p{i}.jpg", quality=92)
    cfg = load_config(BuildConfig, "configs/build/tiny.yaml", [
        f"resolution={R}", "min_side=32", "inpaint.num_inference_steps=1", "quality.enabled=false",
        "latents.enabled=true"])
    builder = TripletBuilder(cfg)
    samples, failures = builder(read_items(str(src)))
    assert not failures and len(samples) == 2
    vae = builder.model_stages[1].pipe.vae
    s = decode_sample(encode_sample(samples[0]))
    assert s.latent.dtype == np.float16 and s.latent.shape == (2, vae.config.latent_channels, R // 8, R // 8)
    assert s.meta["latents"] == {"resolution": R, "vae": "inpaint.model"}
    with torch.inference_mode():
        x = torch.from_numpy(samples[0].image).permute(2, 0, 1)[None].float() / 127.5 - 1  # before JPEG
        ref = vae.encode(x).latent_dist
    torch.testing.assert_close(torch.from_numpy(s.latent[0]).float(), ref.mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.from_numpy(s.latent[1]).float(), ref.logvar[0], atol=2e-3, rtol=2e-3)

    moments = torch.randn(3, 2, 4, 8, 8)
    want = DiagonalGaussianDistribution(torch.cat([moments[:, 0], moments[:, 1]], 1)).sample(
        generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample_latents(moments, torch.Generator().manual_seed(5)), want)

    batch = collate([sample_to_tensors(decode_sample(encode_sample(x)), R) for x in samples])
    assert batch["latent_dist"].shape == (2, 2, 4, R // 8, R // 8)
    fake = SimpleNamespace(components=SimpleNamespace(vae=vae), accelerator=SimpleNamespace(device="cpu"),
                           weight_dtype=torch.float32, cfg=SimpleNamespace(data=SimpleNamespace(use_latents=True)))
    drawn = Trainer.image_latents(fake, batch)
    assert drawn.shape == (2, 4, R // 8, R // 8) and drawn.dtype == torch.float32
    assert not torch.equal(drawn, batch["latent_dist"][:, 0].float())
    del batch["latent_dist"]
    with pytest.raises(TrainingDataError, match="latents.enabled"):
        Trainer.image_latents(fake, batch)


def test_inspect_accepts_latent_member():
    """``latent.npy`` is a known optional member: cnc inspect's validator does not warn about it."""
    from types import SimpleNamespace

    from triplets.inspect.validate import _check_sample
    from triplets.sample import TripletSample, encode_sample

    meta = {"key": "k", "source": "x", "original_size": [R, R], "crop_box": [0, 0, 1, 1, 1], "resolution": R,
            "seed": 0, "models": {}, "mask_area": 0.25, "fg_depth_range": [0, 1], "bg_depth_range": [0, 1],
            "timings": {}, "version": "t"}
    img = synthetic_photo(0, R, R)
    mask = np.zeros((R, R), np.uint8)
    mask[8:24, 8:24] = 1
    depth = np.zeros((R, R), np.uint16)
    s = TripletSample(key="k", image=img, mask=mask, background=img, fg_depth=depth, bg_depth=depth,
                      fg_emb=np.zeros(8, np.float32), bg_emb=np.zeros(8, np.float32), caption="", meta=meta,
                      latent=np.zeros((2, 4, R // 8, R // 8), np.float16))
    findings, summary = [], SimpleNamespace(add_sample=lambda sample: None)
    _check_sample(encode_sample(s), True, summary, lambda msg, key, *a: findings.append(msg))
    assert findings == []
    bad = encode_sample(s)
    bad["latent.npy"] = encode_sample(TripletSample(**{**s.__dict__, "latent": None}))["fg_emb.npy"]
    _check_sample(bad, True, summary, lambda msg, key, *a: findings.append(msg))
    assert findings and "latent.npy" in findings[0]


def test_compact_batches_convert_to_the_float_batch_exactly():
    """The trainer's loader ships uint8 pixels / uint16 depths (≈ 5× fewer bytes between processes) and converts on
    the device: the result equals the float32 batch bit for bit; a sample that needs resizing makes the batch float."""
    from cnc_model.data import apply_condition_dropout, collate, is_compact, sample_to_tensors, to_device_batch
    from triplets.sample import TripletSample

    rng = np.random.default_rng(3)

    def sample(i: int, size: int) -> TripletSample:
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4:, : size // 2] = 1
        return TripletSample(
            key=f"k{i}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask=mask,
            background=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            fg_depth=rng.integers(0, 65536, (size, size), dtype=np.uint16),
            bg_depth=rng.integers(0, 65536, (size, size), dtype=np.uint16),
            fg_emb=rng.normal(size=8).astype(np.float32), bg_emb=rng.normal(size=8).astype(np.float32),
            caption=f"c{i}", meta={})

    samples = [sample(i, R) for i in range(3)]
    want = collate([sample_to_tensors(s, R, 3) for s in samples])
    compact = collate([sample_to_tensors(s, R, 3, compact=True) for s in samples])
    assert is_compact(compact) and compact["fg_depth"].dtype == torch.uint16 and compact["fg_depth"].shape[1] == 1
    sent = sum(compact[k].nbytes for k in ("pixel_values", "fg_depth", "bg_depth", "mask"))
    assert sent * 4.5 < sum(want[k].nbytes for k in ("pixel_values", "fg_depth", "bg_depth", "mask"))
    got = to_device_batch(compact, "cpu", 3)
    for k in ("pixel_values", "fg_depth", "bg_depth", "mask", "fg_emb", "bg_emb"):
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    assert got["captions"] == want["captions"] and torch.equal(to_device_batch(want, "cpu")["fg_depth"], want["fg_depth"])

    # condition dropout zeroes compact entries to what the float path gives
    dropped = apply_condition_dropout(sample_to_tensors(samples[0], R, 1, compact=True),
                                      type("D", (), {"caption": 1, "fg_depth": 1, "bg_depth": 0, "fg_emb": 0,
                                                     "bg_emb": 0})(), np.random.default_rng(0))
    assert to_device_batch(collate([dropped]), None, 1)["fg_depth"].abs().sum() == 0

    # a sample stored at another size is resized in the worker: the mixed batch is float, compact ones converted
    mixed = collate([sample_to_tensors(samples[0], R, 3, compact=True),
                     sample_to_tensors(sample(9, 2 * R), R, 3, compact=True)], depth_channels=3)
    assert not is_compact(mixed) and mixed["fg_depth"].shape == (2, 3, R, R)
    assert torch.equal(mixed["pixel_values"][0], want["pixel_values"][0])


def test_compile_is_operational():
    """``compile`` is an operational key: switching it keeps the plan fingerprint (a build resumes with it)."""
    from cnc.config import load_config
    from pipelines.plan import content_config, fingerprint
    from triplets.config import BuildConfig

    off = load_config(BuildConfig, "configs/build/tiny.yaml", [])
    on = load_config(BuildConfig, "configs/build/tiny.yaml", ["compile=reduce-overhead"])
    assert on.compile == "reduce-overhead" and "compile" not in content_config(on)
    assert fingerprint(on) == fingerprint(off)
    with pytest.raises(Exception, match="compile"):
        load_config(BuildConfig, "configs/build/tiny.yaml", ["compile=fast"])
