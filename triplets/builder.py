"""Run the stages on source items and assemble triplet samples (no Ray here).

:class:`TripletBuilder` owns one instance of every stage (models loaded once) and turns a list
of reader items into ``(samples, failures)`` in three steps the shard worker overlaps:

    decode(items) -> batch           CPU: read, decode, resize (the load stage)
    run_models(batch, seconds) -> batch   the model stages: segment → inpaint → depth → embed [→ quality]
    assemble(batch, pool) -> (samples, failures)   CPU: samples, with the quality statistics (on ``pool``'s threads)
"""

from __future__ import annotations

import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import cnc
from cnc.identity import model_identity
from triplets.batch import ensure_status
from triplets.conditions import FILE_KEYS, condition_stages, resolve_condition_models
from triplets.config import BuildConfig
from triplets.quality import QualityScorer, QualityStage
from triplets.sample import TripletSample
from triplets.stages import InpaintStage, LoadStage
from triplets.stages.base import resolve_device
from triplets.stages.latents import LatentStage

log = logging.getLogger(__name__)
STAGE_NAMES = ("decode", "segment", "inpaint", "depth", "embed", "quality", "latents")
__all__ = ["FILE_KEYS", "STAGE_NAMES", "TripletBuilder", "model_identities", "resolve_models"]
#: Item columns handed to the stages.
ITEM_COLUMNS = ("key", "source", "caption", "mask_path", "mask_kind")


def resolve_models(cfg: BuildConfig) -> dict[str, str]:
    """Check every model of ``cfg`` up front; config key → what to load.

    Raises:
        ModelUnavailableError: one line per missing model, each naming the model and its config key.
    """
    return resolve_condition_models(cfg.model_ids(), cfg.seed)


def model_identities(cfg: BuildConfig, resolved: dict[str, str]) -> dict[str, dict]:
    """Config key → ``{"id", "revision", "identity"}`` (:func:`cnc.identity.model_identity`) of every model."""
    return {key: model_identity(mid, resolved[key]) for key, mid in cfg.model_ids().items()}


class TripletBuilder:
    """All stages of one build, loaded once. ``builder(items) -> (samples, failures)``.

    Args:
        cfg: the build config.
        resolved: output of :func:`resolve_models` (computed here when omitted).
        device: overrides ``cfg.device`` (Ray workers pass their GPU).
        load_models: ``False``: no model stage (a CPU worker of ``ray.pools: split`` decodes and assembles only).
        identities: the models' identities recorded in every sample (default: computed from ``resolved`` here; a
            CPU worker takes them from a model worker, whose node holds the weights).
    """

    def __init__(self, cfg: BuildConfig, resolved: dict[str, str] | None = None, device: str | None = None,
                 load_models: bool = True, identities: dict | None = None):
        self.cfg = cfg
        resolved = resolved or resolve_models(cfg)
        self._init_args = (cfg, resolved, device, load_models, identities)
        self.load = LoadStage(cfg.resolution, cfg.min_side, cfg.max_pixels, cfg.fetch.model_dump(mode="json"),
                              cfg.ray.decode_threads)
        self.models = identities or model_identities(cfg, resolved)
        self.model_stages = []
        self.quality = None
        self.host_pool = None
        if load_models:
            self._load_models(cfg, resolved, device)
        elif cfg.quality.enabled:  # a CPU worker of ``ray.pools: split`` computes the model-free statistics
            self.quality = QualityScorer(None, None, cfg.inpaint.dilation_px, cfg.quality.change_floor,
                                         cfg.depth.preprocess)

    def _load_models(self, cfg: BuildConfig, resolved: dict[str, str], device: str | None) -> None:
        dev = device or cfg.device
        common = dict(device=dev, dtype=cfg.dtype)
        ip = cfg.inpaint
        # the condition stages: the same function builds them for cnc sample / compose (triplets.conditions)
        segment, depth, embed = condition_stages(cfg, resolved, dev,
                                                 image_disparity=cfg.image_disparity_mode(
                                                     resolved.get("segment.saliency_model") == resolved["depth.model"]))
        self.model_stages = [
            segment,
            InpaintStage(resolved["inpaint.model"], ip.prompt, ip.negative_prompt, ip.num_inference_steps,
                         ip.guidance_scale, ip.strength, ip.dilation_px, ip.paste_back, base_seed=cfg.seed,
                         compile_mode=cfg.compile, channels_last=cfg.channels_last, **common),
            depth,
            embed,
        ]
        if cfg.quality.enabled:  # the build's own CLIP instance and depth maps, never a second copy or pass
            self.quality = QualityScorer(embed.embedder if cfg.quality.clip_sim else None, None, ip.dilation_px,
                                         cfg.quality.change_floor, cfg.depth.preprocess)
            if cfg.quality.clip_sim:
                self.model_stages.append(QualityStage(self.quality))
        if cfg.latents.enabled:  # the inpainting pipeline's VAE, not a second copy
            inpaint = self.model_stages[1]
            self.model_stages.append(LatentStage(inpaint.pipe.vae, cfg.latents.resolution or cfg.resolution))
        # per-image host work of the stages (priors, prompts...) in parallel while the accelerator waits for it; on a
        # CPU the models themselves use the cores, so it stays inline there
        on_accelerator = resolve_device(dev) != "cpu"
        self.host_pool = (ThreadPoolExecutor(cfg.ray.encode_threads, "cnc-host")
                          if cfg.ray.encode_threads > 1 and on_accelerator else None)
        for stage in self.model_stages:
            stage.batch_size = cfg.stage_batch_size(stage.name)
            stage.host_pool = self.host_pool

    def __reduce__(self):
        """Pickle by the constructor arguments: the receiver loads every model once, and the quality stage shares
        them again (pickling stage by stage would give it copies)."""
        return TripletBuilder, self._init_args

    @property
    def stages(self) -> list:
        """Every stage in order: load, then the model stages."""
        return [self.load, *self.model_stages]

    def decode(self, items: list[dict], fetched: list[tuple] | None = None) -> dict:
        """Reader items → a decoded batch (``image``, ``dataset_mask``... see :mod:`triplets.stages.load`).

        ``fetched``: the items' bytes already read (:meth:`triplets.fetch.Fetcher.map_items`), else read here.
        """
        rows = {k: [it.get(k) for it in items] for k in ITEM_COLUMNS}
        if fetched is not None:
            rows["fetched"] = list(fetched)
        batch = self.load(ensure_status(rows))
        batch.pop("fetched", None)  # bytes stay here: the decoded pixels travel on
        return batch

    def run_models(self, batch: dict, seconds: collections.Counter | None = None) -> dict:
        """The model stages on a decoded batch; adds each stage's wall time to ``seconds[stage.name]``."""
        for stage in self.model_stages:
            t = time.perf_counter()
            batch = stage(batch)
            if seconds is not None:
                seconds[stage.name] += time.perf_counter() - t
        return batch

    def run_batch(self, items: list[dict]) -> dict:
        """Items → the final batch dict (all columns, see :mod:`triplets.batch`)."""
        return self.run_models(self.decode(items))

    def __call__(self, items: list[dict]) -> tuple[list[TripletSample], list[dict]]:
        samples, failures = [], []
        for start in range(0, len(items), self.cfg.batch_size):
            s, f = self.assemble(self.run_batch(items[start:start + self.cfg.batch_size]))
            samples += s
            failures += f
        return samples, failures

    def quality_statistics(self, batch: dict, rows: list[int], pool=None) -> dict[int, dict | Exception]:
        """Row → ``quality`` dict of ``rows`` of a final batch (:func:`triplets.quality.statistics`; NumPy/OpenCV,
        no model), on ``pool``'s threads when given (the worker's encode threads: off the model thread). A row whose
        statistics raise maps to the exception (a per-sample failure, never the batch's)."""
        q = self.quality
        sims = batch.get("quality_clip_sim")

        def one(i: int) -> dict | Exception:
            try:
                return q.statistics(batch["image"][i], batch["mask"][i], batch["background"][i], batch["bg_depth"][i],
                                    batch["image_disparity"][i] if "image_disparity" in batch else None,
                                    None if sims is None else sims[i])
            except Exception as exc:  # noqa: BLE001 - reported per sample by assemble
                log.warning("quality statistics failed on %s: %s: %s", batch["key"][i], type(exc).__name__, exc)
                return exc

        return dict(zip(rows, pool.map(one, rows) if pool is not None else map(one, rows)))

    def assemble(self, batch: dict, pool=None, seconds: collections.Counter | None = None,
                 ) -> tuple[list[TripletSample], list[dict]]:
        """Final batch → (samples of healthy rows, failure records ``{key, source, stage, reason}``).

        With quality scores, their statistics run here (on ``pool``'s threads when given); their wall time is added
        to ``seconds["quality_stats"]``; a row whose statistics fail is a failure of stage ``quality``.
        """
        samples, failures = [], []
        healthy_rows = [i for i, e in enumerate(batch["error"]) if not e]
        quality = {}
        if self.quality is not None and healthy_rows:
            t = time.perf_counter()
            quality = self.quality_statistics(batch, healthy_rows, pool)
            if seconds is not None:
                seconds["quality_stats"] += time.perf_counter() - t
        for i, key in enumerate(batch["key"]):
            if batch["error"][i]:
                failures.append({"key": key, "source": batch["source"][i], "stage": batch["error_stage"][i],
                                 "reason": batch["error"][i]})
                continue
            if isinstance(quality.get(i), Exception):
                exc = quality[i]
                failures.append({"key": key, "source": batch["source"][i], "stage": "quality",
                                 "reason": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            timings = ({s: round(float(batch[f"time_{s}"][i]), 6) for s in STAGE_NAMES if f"time_{s}" in batch}
                       if self.cfg.sample_timings else {})
            meta = {
                "key": key, "source": batch["source"][i],
                "original_size": [int(x) for x in batch["original_size"][i]],
                "crop_box": [float(x) for x in batch["crop_box"][i]],
                "resolution": self.cfg.resolution, "seed": int(batch["seed"][i]), "models": self.models,
                "mask_source": str(batch["mask_source"][i]), "mask_area": float(batch["mask_area"][i]),
                "fg_depth_range": [float(x) for x in batch["fg_depth_range"][i]],
                "bg_depth_range": [float(x) for x in batch["bg_depth_range"][i]],
                "inpaint": {"steps": self.cfg.inpaint.num_inference_steps, "guidance": self.cfg.inpaint.guidance_scale,
                            "paste_back": self.cfg.inpaint.paste_back},
                "embed_fg_source": self.cfg.embed.fg_source, "timings": timings, "version": cnc.__version__,
            }
            if self.quality is not None:
                meta["quality"] = quality[i]
            if self.cfg.latents.enabled:
                meta["latents"] = {"resolution": self.cfg.latents.resolution or self.cfg.resolution,
                                   "vae": "inpaint.model"}
            samples.append(TripletSample(
                key=key, image=batch["image"][i], mask=batch["mask"][i].astype(np.uint8),
                background=batch["background"][i], fg_depth=batch["fg_depth"][i], bg_depth=batch["bg_depth"][i],
                fg_emb=batch["fg_emb"][i].astype(np.float32), bg_emb=batch["bg_emb"][i].astype(np.float32),
                caption=batch["caption"][i] or "", meta=meta,
                latent=batch["latent"][i] if self.cfg.latents.enabled else None))
        return samples, failures
