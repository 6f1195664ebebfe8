"""Typed configuration of a triplet build (``configs/build/*.yaml``).

A model field takes a hub id, a local folder, or the special value ``tiny`` (a seeded
random tiny model, written once as a real checkpoint by :mod:`cnc.tiny_store`).
"""

from __future__ import annotations

import logging
import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cnc.config import FINITE_FLOATS, MAX_RESOLUTION, GuidanceScale, Seed, Steps

#: The input formats (one reader each in :mod:`triplets.readers`); ``input_format: auto`` detects one.
INPUT_FORMATS = ("folder", "coco", "webdataset", "pickapic", "table")
#: Devices a build runs on (``auto`` = CUDA when present).
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), **FINITE_FLOATS)


class SegmentConfig(_Strict):
    """Salient-object mask M."""

    backend: str = Field("sam", description="registry name: sam | dataset | u2net")
    sam_checkpoint: str = Field("tiny", description="local path of a segment-anything .pth checkpoint, or 'tiny'")
    sam_model_type: str = Field("vit_h", description="segment-anything registry name: vit_h | vit_l | vit_b")
    saliency_model: str = Field("Intel/dpt-large", description="DPT used for the saliency prior (sam backend)")
    sam_attention: Literal["bias", "folded"] = Field(
        "bias", description="SAM image-encoder attention: 'bias' = SDPA with the relative-position bias as a dense "
                            "mask (memory-efficient kernel); 'folded' = the bias folded into q·k, no mask (flash "
                            "attention eligible; same logits within float rounding). "
                            "benchmarks/gpu_check.sh measures both (variant sam-folded)")
    sam_precision: Literal["autocast", "weights"] = Field(
        "autocast", description="with a reduced dtype: 'autocast' = fp32 SAM weights under autocast; 'weights' = the "
                                "image encoder's weights in that dtype (variant sam-fp16-weights)")
    prior_quantile: float = Field(0.85, gt=0, lt=1, description="disparity quantile defining the near region")
    u2net_checkpoint: str = Field(
        "checkpoints/u2net.pth",
        description="u2net backend: local path of the released u2net.pth (or u2netp.pth; widths are read from the "
                    "file), or 'tiny'")
    u2net_threshold: float = Field(0.5, gt=0, lt=1, description="u2net backend: threshold of the fused saliency map "
                                                                "(reference 0.5)")
    min_area: float = Field(0.01, ge=0, le=1, description="masks covering less of the image fail ('empty mask')")
    batch_size: int | None = Field(None, ge=1, description="rows per model call of this stage (default: the "
                                                           "top-level batch_size)")
    max_area: float = Field(0.95, ge=0, le=1, description="masks covering more of the image fail ('near-full mask')")


class InpaintConfig(_Strict):
    """Background I_b by Stable Diffusion inpainting (reference settings by default)."""

    model: str = Field("stable-diffusion-v1-5/stable-diffusion-inpainting",
                       description="StableDiffusionInpaintPipeline folder or hub id ('tiny': seeded tiny model)")
    prompt: str = Field("empty scenery, ultra detailed, no people", description="inpainting prompt (reference)")
    negative_prompt: str = Field("low resolution, worst quality, low quality",
                                 description="inpainting negative prompt (reference)")
    num_inference_steps: Steps = Field(25, description="inpainting denoising steps (reference: 25)")
    guidance_scale: GuidanceScale = Field(10.0, description="inpainting classifier-free guidance (reference: 10)")
    strength: float = Field(1.0, gt=0, le=1, description="inpainting strength (1 = the masked region from "
                                                       "pure noise, reference)")
    dilation_px: int = Field(50, ge=0, le=512, description="square dilation of M at 512 px; scaled with the "
                                                           "resolution")
    batch_size: int | None = Field(None, ge=1, description="rows per model call of this stage (default: the "
                                                           "top-level batch_size)")
    paste_back: bool = Field(True, description="keep I's pixels outside the dilated mask")


class DepthConfig(_Strict):
    """MiDaS (DPT) depth of I_f and I_b."""

    model: str = Field("Intel/dpt-large", description="DPTForDepthEstimation folder or hub id ('tiny': seeded tiny "
                                                        "model)")
    mask_foreground_depth: bool = Field(False, description="multiply D_f by M (reference: no)")
    batch_size: int | None = Field(None, ge=1, description="rows per model call of this stage (default: the "
                                                           "top-level batch_size)")
    preprocess: Literal["processor", "reference"] = Field(
        "processor", description="model input: 'processor' = the DPT image processor (resize, mean/std); "
                                 "'reference' = the RGB image in [0, 1] at build resolution, no processor (as the "
                                 "reference fed MiDaS; matches the released weights)")


class EmbedConfig(_Strict):
    """CLIP image embeddings."""

    model: str = Field("openai/clip-vit-large-patch14", description="CLIPVisionModelWithProjection folder or hub "
                                                                      "id ('tiny': seeded tiny model)")
    batch_size: int | None = Field(None, ge=1, description="rows per model call of this stage (default: the "
                                                           "top-level batch_size)")
    fg_source: Literal["image", "foreground"] = Field(
        "image", description="e_f from the full image I (reference) or from I_f")


class QualityConfig(_Strict):
    """Per-sample quality scores in each sample's json (``triplets.quality``; changes tar content)."""

    enabled: bool = Field(True, description="compute removal / depth-order / mask-shape scores during the build "
                                            "(reuses the depth maps and the CLIP model the build already has)")
    batch_size: int | None = Field(None, ge=1, description="rows per model call of this stage (default: the "
                                                           "top-level batch_size)")
    change_floor: float = Field(6.0, ge=0, le=254, description="removal.changed: a pixel of M counts as changed when "
                                                               "its locally averaged difference (of 255, global "
                                                               "shift removed) exceeds this and the noise outside "
                                                               "the inpainted region")
    clip_sim: bool = Field(True, description="measure removal.clip_sim (CLIP on two crops per sample on the model "
                                             "thread; the only model work of the quality stage)")

    @model_validator(mode="before")
    @classmethod
    def _version_1_keys(cls, data):
        """Configs saved by builds of quality version 1 carry ``change_threshold``, a pixel threshold of a score
        that no longer exists: dropped (with a warning) so ``cnc score`` can rescore those builds."""
        if isinstance(data, dict) and "change_threshold" in data:
            logging.getLogger(__name__).warning(
                "quality.change_threshold (quality version 1) is no longer used; ignored (see quality.change_floor)")
            data = {k: v for k, v in data.items() if k != "change_threshold"}
        return data


class LatentsConfig(_Strict):
    """Optional ``latent.npy``: the VAE latent distribution of I for the trainer (``triplets.stages.latents``)."""

    enabled: bool = Field(False, description="store latent.npy (mean and log-variance, float16) in every sample; the "
                                             "trainer's data.use_latents samples from it instead of encoding")
    resolution: int | None = Field(None, ge=8, le=MAX_RESOLUTION, description="side the VAE encodes I at (the "
                                                                              "trainer's data.resolution); default: "
                                                                              "resolution")
    batch_size: int | None = Field(None, ge=1, description="rows per model call of this stage (default: the "
                                                           "top-level batch_size)")


#: ``X-Robots-Tag`` directives that opt an image out by default (img2dataset's default list).
DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")


class FetchConfig(_Strict):
    """Reading source images (``triplets.fetch``): web URLs concurrently with timeouts, retries and opt-outs;
    object stores and files in a bounded thread pool. Operational: not part of the plan fingerprint."""

    concurrency: int = Field(32, ge=1, le=1024, description="HTTP(S) requests in flight per worker")
    object_store_concurrency: int = Field(8, ge=1, le=256, description="reads of s3://, gs://, local files and tar "
                                                                        "members in flight per worker")
    lookahead: int = Field(2048, ge=1, description="most items fetched ahead of decoding per worker (a URL that "
                                                   "hangs stops nothing behind it until this or buffer_mb is reached)")
    buffer_mb: int = Field(256, ge=1, description="most MB fetched ahead of decoding per worker (plus up to "
                                                  "concurrency x max_bytes being received)")
    connect_timeout_s: float = Field(5.0, gt=0, description="HTTP: longest wait for a TCP/TLS connection")
    read_timeout_s: float = Field(10.0, gt=0, description="HTTP: longest wait for the next bytes of an answer")
    deadline_s: float = Field(30.0, gt=0, description="HTTP: total time one URL may take, retries included; a URL "
                                                      "still unanswered then fails with 'deadline'")
    retries: int = Field(2, ge=0, le=10, description="HTTP: retries after a timeout, a dropped connection, a 5xx or "
                                                    "a 429 answer")
    backoff_s: float = Field(1.0, ge=0, description="HTTP: wait before retry n = backoff_s x 2^(n-1) x [0.5, 1.5) "
                                                    "(jitter), or the server's Retry-After when it sends one")
    max_bytes: int = Field(50_000_000, ge=1, description="HTTP: larger answers fail ('too large') without being "
                                                         "read further")
    user_agent: str | None = Field(None, description="HTTP User-Agent (default: cnc/<version> ...)")
    disallowed_header_directives: list[str] = Field(
        list(DISALLOWED_DIRECTIVES), description="HTTP: skip images whose X-Robots-Tag carries one of these "
                                                 "directives (for every robot, or for 'cnc:'); [] = fetch everything")

    @field_validator("disallowed_header_directives")
    @classmethod
    def _directives(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(d.strip().lower() for d in v if d.strip()))


class RayConfig(_Strict):
    """Ray execution (pipelines)."""

    num_workers: int = Field(0, ge=0, description="model workers; 0 = one per GPU, or per CPU pair without GPUs")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPU share of one worker (fractional allowed)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs a model worker reserves in Ray")
    torch_threads: int = Field(0, ge=0, description="torch threads per worker, 0 = cpus_per_worker")
    encode_threads: int = Field(4, ge=1, description="threads of a worker's writer encoding JPEG/PNG in parallel "
                                                     "(tar bytes do not depend on it); on a GPU as many again run "
                                                     "the stages' per-image host work (saliency priors, SAM prompts) "
                                                     "in parallel (1 = inline)")
    pools: Literal["auto", "single", "split"] = Field(
        "auto", description="single: one worker per GPU fetches, decodes, runs the models, encodes and writes; "
                            "split: model workers (one per GPU) run only the models, CPU workers on any node do the "
                            "rest (pipelines.pools; docs/cluster.md); auto: split when the models run on GPUs and "
                            "CPUs are left for at least one CPU worker, else single")
    cpu_workers: int = Field(0, ge=0, description="split: CPU workers (fetch, decode, encode, write, commit); 0 = "
                                                  "the CPUs the model workers leave free / cpus_per_cpu_worker")
    cpus_per_cpu_worker: float = Field(1.0, gt=0, description="split: Ray CPUs of one CPU worker")
    batches_in_flight: int = Field(2, ge=1, description="split: decoded batches a CPU worker keeps queued at the "
                                                        "model workers")
    decode_threads: int = Field(2, ge=1, description="threads of a worker decoding and resizing a batch's images "
                                                     "in parallel (pixels do not depend on it)")
    max_shard_retries: int = Field(2, ge=0, description="retries of a shard whose worker died")
    progress_interval_s: float = Field(5.0, gt=0, description="off a terminal: a progress log line this often")
    worker_start_timeout_s: float = Field(
        900.0, gt=0, description="give up when no worker has started (loaded its models) after this long")
    connect_timeout_s: float = Field(
        60.0, gt=0, description="--address/$RAY_ADDRESS: refuse in one line when the cluster does not accept a "
                                "connection within this many seconds")


class StorageConfig(_Strict):
    """Where and how outputs are written (operational: not part of the plan fingerprint)."""

    scratch_dir: str | None = Field(
        None, description="local folder where shards are staged before upload to an object store "
                          "(default: the system temporary folder)")
    verify: bool = Field(False, description="on resume, re-hash every committed shard against its marker "
                                            "(default: marker + size; --verify)")
    lease_seconds: float = Field(120.0, gt=0, description="object stores: a build lease not refreshed for this "
                                                          "long is stale and may be taken over")


class TableConfig(_Strict):
    """Column names of a table input (``input_format: table``; img2dataset's conventions by default)."""

    image_column: str = Field("url", description="column naming each image: a path (relative to the table's "
                                                 "folder) or a URL")
    caption_column: str = Field("caption", description="caption column (null = empty caption)")
    key_column: str = Field("key", description="sample key column; when a file lacks it the key is "
                                               "<file stem>/<row, 9 digits>")
    mask_column: str | None = Field(None, description="optional column naming a binary dataset mask (path or URL)")


class BuildConfig(_Strict):
    """Everything that defines a shard build. Saved as ``OUTPUT/_cnc/config.yaml``."""

    CONFIG_KIND: ClassVar[str] = "build"  # shipped configs named without a folder are looked up in build/

    resolution: int = Field(512, ge=16, le=MAX_RESOLUTION, description="side of the square crop of every field "
                                                                       f"(at most {MAX_RESOLUTION})")
    min_side: int = Field(256, ge=1, description="images whose short side is smaller fail")
    max_pixels: int = Field(64_000_000, ge=1, description="decompression-bomb limit")
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality of I and I_b in the shards")
    sample_timings: bool = Field(
        False, description="store per-stage seconds in each sample's json; off by default because it makes tars "
                           "differ between identical runs (per-stage times always go to the shard stats marker)")
    batch_size: int = Field(4, ge=1, description="samples per batch (decode → models → write); the default rows per "
                                                 "model call of every stage without its own <stage>.batch_size")
    samples_per_shard: int = Field(1000, ge=1, description="input items per shard (failed ones leave it smaller)")
    max_failure_fraction: float = Field(0.05, ge=0, le=1, description="exit status 1 when more than this share "
                                        "of the input items failed (the committed shards stay usable)")
    seed: Seed = Field(0, description="base seed (0 .. 2**32-1); per-sample seeds derive from (seed, key)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = fp16 on CUDA, fp32 on CPU")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the inpainting UNet (≈ 80 % of a triplet's FLOPs) with this mode; "
                           "compiles once per batch shape at start-up, outputs change within float rounding "
                           "(operational: not part of the plan fingerprint); measured in benchmarks/gpu_suite.py")
    channels_last: bool = Field(
        False, description="store the inpainting UNet's weights and activations channels-last (NHWC: tensor-core "
                           "convolutions without layout transposes); outputs change within float rounding "
                           "(operational); measured by benchmarks/gpu_check.sh (variant channels-last)")
    input_format: Literal[("auto", *INPUT_FORMATS)] = Field(
        "auto", description="the input's format (cnc build --input-format); auto = detected from the path")
    input_hash: bool = Field(
        False, description="table inputs: fingerprint every input file by a sha256 of its content (reads every "
                           "byte once) instead of size + etag/mtime")
    allow_outside_input: bool = Field(
        False, description="follow symlinks and COCO file_names that point outside the input root (refused per "
                           "item by default)")
    table: TableConfig = TableConfig()
    segment: SegmentConfig = SegmentConfig()
    inpaint: InpaintConfig = InpaintConfig()
    depth: DepthConfig = DepthConfig()
    embed: EmbedConfig = EmbedConfig()
    quality: QualityConfig = QualityConfig()
    latents: LatentsConfig = LatentsConfig()
    fetch: FetchConfig = FetchConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE_PATTERN.match(v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _check(self) -> BuildConfig:
        if self.segment.min_area >= self.segment.max_area:
            raise ValueError("segment.min_area must be below segment.max_area")
        return self

    def stage_batch_size(self, stage: str) -> int:
        """Rows per model call of ``stage`` (segment | inpaint | depth | embed | quality | latents)."""
        return getattr(self, stage).batch_size or self.batch_size

    def image_disparity_mode(self, same_dpt: bool | None = None) -> str:
        """How the depth stage provides D(I), the raw disparity of I the quality scores need: ``reuse`` the ``sam``
        prior's pass when it is the depth model in the same input mode (the same shared DPT instance), else
        ``compute`` it in the depth stage's own call (a third image beside I_f and I_b); ``off`` without quality
        scores. ``same_dpt``: whether the prior's model is the depth model (default: the same config ids)."""
        if not self.quality.enabled:
            return "off"
        if same_dpt is None:
            same_dpt = self.segment.saliency_model == self.depth.model
        same = self.segment.backend == "sam" and same_dpt
        return "reuse" if same and self.depth.preprocess == "processor" else "compute"

    def model_ids(self) -> dict[str, str]:
        """Config key → model id of every model this build loads."""
        ids = {"inpaint.model": self.inpaint.model, "depth.model": self.depth.model, "embed.model": self.embed.model}
        if self.segment.backend == "sam":
            ids["segment.sam_checkpoint"] = self.segment.sam_checkpoint
            ids["segment.saliency_model"] = self.segment.saliency_model
        if self.segment.backend == "u2net":
            ids["segment.u2net_checkpoint"] = self.segment.u2net_checkpoint
        return ids
