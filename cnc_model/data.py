"""Streaming training data: ``cnc build`` shards (WebDataset tars of triplet samples) -> training batches.

Per data-loader worker (everything below runs inside the worker)::

    shard URLs --split by node (rank) and worker--> endless shuffled passes over this worker's shards
      -> tar members -> raw samples        (a corrupt / truncated tar or an undecodable sample is skipped,
      -> shuffle buffer                      logged and counted -- never fatal)
      -> [resume: drop the samples a checkpoint already consumed]
      -> decode_sample -> [quality filter on the json: dropped samples counted by condition]
      -> tensors -> condition dropout -> batches of B
      -> ``batches_per_epoch`` batches per worker and epoch  (webdataset's ``.batched(B).with_epoch(n)``)

Sharding: with at least ``world_size * num_workers`` shards every (rank, worker) reads its own disjoint subset of
shards (``shards[gid::world*workers]``), resampled endlessly in seeded random passes; with fewer shards every worker
reads all shards in the same order and keeps every ``world*workers``-th sample. Either way ranks and workers see
disjoint samples. Randomness (shard order, shuffle buffer, dropout) is seeded from ``(seed, epoch, rank, worker)``
only, so a stream is reproducible and :class:`TrainDataLoader` can resume it exactly: the data position saved in a
checkpoint is, per worker, the number of (post-shuffle) raw samples consumed.

Batch (``R`` = resolution, ``E`` = CLIP embedding width, ``C`` = ``depth_channels``)::

    pixel_values  (B, 3, R, R) float32 in [-1, 1]     image I
    fg_depth      (B, C, R, R) float32 in [0, 1]      uint16 disparity / 65535, repeated to C channels
    bg_depth      (B, C, R, R) float32 in [0, 1]
    mask          (B, 1, R, R) float32 in {0, 1}      soft-guidance mask M (never dropped)
    fg_emb        (B, E) float32                       CLIP image_embeds (zeros when dropped)
    bg_emb        (B, E) float32
    latent_dist   (B, 2, 4, h, w) float16              only from shards built with latents.enabled: VAE mean and
                                                       log-variance of I (see sample_latents)
    captions      list[str]                            "" when dropped
    input_ids     (B, 77) int64                        only when a tokenizer is given
    keys          list[str]                            sample keys

Compact batches (``compact=True``, what ``cnc train`` uses): the loader's worker processes ship the stored integer
pixels instead and :func:`to_device_batch` converts them on the training device, so ~5× fewer bytes cross processes
and the host→device copy (at 512², 2.1 MB instead of 10.5 MB per sample)::

    pixel_values  (B, 3, R, R) uint8 in [0, 255]      -> float32 x / 127.5 - 1
    fg_depth      (B, 1, R, R) uint16 in [0, 65535]   -> float32 x / 65535, repeated to C channels
    bg_depth      (B, 1, R, R) uint16
    mask          (B, 1, R, R) uint8 in {0, 1}        -> float32

The conversion is the same float32 arithmetic as the loader's own (bit-identical on the CPU). A sample whose stored
size differs from the training resolution is resized in the worker and shipped as float32 (a batch mixing both is
shipped as float32).

Size: the loader's stages (decode, dropout, filter, shuffle, exact resume) share one per-worker stream state and are
read top to bottom as one pipeline.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from cnc.base.errors import UserError
from cnc.base.location import resolve
from triplets.sample import TripletSample, decode_sample, validate_sample
from triplets.shardio import ShardReadError, TarStream, load_marker, resolve_shards
from triplets.shardio.names import marker_candidates

logger = logging.getLogger(__name__)

#: Batch entries that hold tensors stacked along the batch dimension.
TENSOR_FIELDS = ("pixel_values", "fg_depth", "bg_depth", "mask", "fg_emb", "bg_emb")
META_KEY = "__meta__"


# ----------------------------------------------------------------------------------------------------- shard URLs
class TrainingDataError(UserError, ValueError):
    """The training shards cannot be trained on (the pre-flight check failed)."""


def count_marked_samples(urls: Sequence[str]) -> int | None:
    """Sum of ``nsamples`` in the shards' ``_stats.json`` markers; ``None`` if any marker is missing/unreadable."""
    total = 0
    for url in urls:
        for candidate in marker_candidates(url):  # _cnc/ first, then beside the tar (legacy layout)
            try:
                marker = load_marker(resolve(candidate))
            except Exception:  # noqa: BLE001 - any unreadable marker (or a pipe: shard) means "unknown"
                continue
            if marker is not None and marker.nsamples is not None:
                total += marker.nsamples
                break
        else:
            return None
    return total


# ------------------------------------------------------------------------------------------------- sample decoding
@dataclass(frozen=True)
class ConditionDropout:
    """Per-sample, independent dropout probabilities (reference: 0.1 each).

    Attributes:
        caption: caption -> "" (encoded by CLIP like any text, not a zero tensor).
        fg_depth / bg_depth: the depth map -> zeros.
        fg_emb / bg_emb: the CLIP embedding -> zeros.
    """

    caption: float = 0.1
    fg_depth: float = 0.1
    bg_depth: float = 0.1
    fg_emb: float = 0.1
    bg_emb: float = 0.1

    @classmethod
    def for_stage(cls, stage: str, caption: float = 0.1, depth: float = 0.1, embedding: float = 0.1):
        """Reference rule: ``local`` drops only depths, ``global`` only embeddings, ``joint`` both."""
        d = depth if stage in ("local", "joint") else 0.0
        e = embedding if stage in ("global", "joint") else 0.0
        return cls(caption=caption, fg_depth=d, bg_depth=d, fg_emb=e, bg_emb=e)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(x[None], size=(size, size), mode=mode, **kwargs)[0]


#: Batch entries that compact batches hold as integers (see the module docstring).
COMPACT_FIELDS = ("pixel_values", "fg_depth", "bg_depth", "mask")


def is_compact(item: dict[str, Any]) -> bool:
    """Whether a sample or batch holds the integer (compact) pixels."""
    return item["pixel_values"].dtype == torch.uint8


def _from_compact(name: str, value: torch.Tensor, depth_channels: int) -> torch.Tensor:
    """One compact entry ``(B, C, R, R)`` → its float32 layout (the loader's own arithmetic)."""
    value = value.float()
    if name == "pixel_values":
        return value.div(127.5).sub(1.0)
    if name == "mask":
        return value
    return value.div(65535.0).expand(-1, depth_channels, -1, -1)  # depths


def to_device_batch(batch: dict[str, Any], device: torch.device | str | None = None, depth_channels: int = 3,
                    non_blocking: bool = False) -> dict[str, Any]:
    """A batch (compact or float, see the module docstring) with its tensors on ``device`` in the float32 layout.

    Compact entries are copied as integers and converted there: ``pixel_values`` → ``(B, 3, R, R)`` in [-1, 1],
    depths → ``(B, depth_channels, R, R)`` in [0, 1], ``mask`` → ``(B, 1, R, R)`` in {0, 1}. Other tensors are only
    moved; non-tensor entries are passed through.
    """
    compact = is_compact(batch)
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[name] = value
            continue
        value = value.to(device, non_blocking=non_blocking) if device is not None else value
        out[name] = _from_compact(name, value, depth_channels) if compact and name in COMPACT_FIELDS else value
    return out


def sample_to_tensors(s: TripletSample, resolution: int | None = None, depth_channels: int = 3,
                      compact: bool = False) -> dict[str, Any]:
    """One :class:`~triplets.sample.TripletSample` -> tensors (see the module docstring for ranges and shapes).

    ``resolution`` resizes (bilinear for image and depths, nearest for the mask) when the shards were built at
    another size; ``None`` keeps the stored size. ``compact`` keeps the stored integers (uint8 image and mask, uint16
    single-channel depths) for :func:`to_device_batch`, unless the sample has to be resized.
    """
    stored = s.image.shape[0] == s.image.shape[1] and resolution in (None, s.image.shape[0])
    if compact and stored:
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1).contiguous(),
            "fg_depth": torch.from_numpy(np.ascontiguousarray(s.fg_depth, np.uint16))[None],
            "bg_depth": torch.from_numpy(np.ascontiguousarray(s.bg_depth, np.uint16))[None],
            "mask": torch.from_numpy((s.mask > 0).astype(np.uint8))[None],
            **_vectors(s),
        }
    image = torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    fg = torch.from_numpy(s.fg_depth_float())[None]
    bg = torch.from_numpy(s.bg_depth_float())[None]
    mask = torch.from_numpy((s.mask > 0).astype(np.float32))[None]
    if resolution is not None:
        image, fg, bg = (_resize(t, resolution, "bilinear") for t in (image, fg, bg))
        mask = _resize(mask, resolution, "nearest")
    return {
        "pixel_values": image.clamp(-1, 1),
        "fg_depth": fg.clamp(0, 1).repeat(depth_channels, 1, 1),
        "bg_depth": bg.clamp(0, 1).repeat(depth_channels, 1, 1),
        "mask": mask,
        **_vectors(s),
    }


def _vectors(s: TripletSample) -> dict[str, Any]:
    return {
        "fg_emb": torch.from_numpy(np.asarray(s.fg_emb, np.float32)),
        "bg_emb": torch.from_numpy(np.asarray(s.bg_emb, np.float32)),
        "caption": s.caption,
        "key": s.key,
        **({} if s.latent is None else {"latent_dist": torch.from_numpy(np.ascontiguousarray(s.latent))}),
    }


def sample_latents(latent_dist: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from stored VAE latent distributions: ``(B, 2, C, h, w)`` (mean, log-variance; any float dtype) →
    ``(B, C, h, w)`` float32 ``mean + exp(logvar / 2) · ε`` — what ``vae.encode(x).latent_dist.sample()`` draws
    (diffusers clamps the log-variance to [-30, 20] too). Not yet scaled by the VAE's ``scaling_factor``."""
    mean, logvar = latent_dist[:, 0].float(), latent_dist[:, 1].float().clamp(-30.0, 20.0)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def apply_condition_dropout(item: dict[str, Any], dropout: ConditionDropout, rng: np.random.Generator) -> dict:
    """Drop conditions of one sample in place (five independent draws, always made, so streams stay aligned)."""
    draws = rng.random(5)
    if draws[0] < dropout.caption:
        item["caption"] = ""
    for draw, name in zip(draws[1:], ("fg_depth", "bg_depth", "fg_emb", "bg_emb")):
        if draw < getattr(dropout, name):
            item[name] = torch.zeros_like(item[name])
    return item


def collate(items: list[dict[str, Any]], tokenizer=None, depth_channels: int = 3) -> dict[str, Any]:
    """Stack samples into a batch; tokenises the captions (padded/truncated to the tokenizer's length) if asked.
    Compact samples stay compact unless mixed with float ones (then all become float32, ``depth_channels`` deep)."""
    if len({is_compact(it) for it in items}) > 1:
        items = [{**it, **{k: _from_compact(k, it[k][None], depth_channels)[0] for k in COMPACT_FIELDS}}
                 if is_compact(it) else it for it in items]
    batch: dict[str, Any] = {name: torch.stack([it[name] for it in items]) for name in TENSOR_FIELDS}
    if all("latent_dist" in it for it in items):  # shards built with latents.enabled
        batch["latent_dist"] = torch.stack([it["latent_dist"] for it in items])
    batch["captions"] = [it["caption"] for it in items]
    batch["keys"] = [it["key"] for it in items]
    if tokenizer is not None:
        batch["input_ids"] = tokenize(tokenizer, batch["captions"])
    return batch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> ``(B, model_max_length)`` ids (77 for CLIP)."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ------------------------------------------------------------------------------------------------ per-worker stream
class _ErrorLog:
    """Counts skipped shards / samples; logs the first few at WARNING and then every 100th."""

    def __init__(self, counts: dict | None = None, filtered: dict | None = None) -> None:
        self.counts = Counter(counts or {})
        self.filtered = Counter(filtered or {})  # samples dropped by the quality filter, by failed condition
        self.last = ""
        self.pass_size = 0  # samples of this worker's largest complete pass so far

    def __call__(self, kind: str, where: str, exc: BaseException) -> None:
        self.counts[kind] += 1
        self.last = f"{kind} {where}: {type(exc).__name__}: {exc}"
        n = self.counts[kind]
        if n <= 3 or n % 100 == 0:
            logger.warning("skipping corrupt %s (#%d): %s", kind, n, self.last)


def _tar_samples(url: str, errors: _ErrorLog) -> Iterator[dict]:
    """Raw ``{__key__, suffix: bytes, __url__}`` samples of one tar (:class:`~triplets.shardio.TarStream`).

    A truncated or corrupt tar (read error, or no end-of-archive marker after the last member) ends the shard:
    the samples before the damage are used, the incomplete last one is dropped, the shard is counted as corrupt.
    """
    try:
        for raw in TarStream(url).samples():
            if raw["__key__"].startswith("__"):
                continue
            raw["__url__"] = url
            yield raw
    except ShardReadError as exc:
        errors("shard", url, exc)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class TripletStream(IterableDataset):
    """Endless, seeded, resumable stream of training batches (see the module docstring).

    Args:
        urls: shard URLs (:func:`triplets.shardio.resolve_shards`).
        batch_size: per-process batch size B.
        batches_per_epoch: batches each worker yields per epoch (``with_epoch`` semantics).
        rank, world_size: this process and the number of processes (node split).
        seed: base seed; the stream depends on ``(seed, epoch, rank, worker)`` only.
        shuffle_buffer: samples in the shuffle buffer (0/1 = no shuffling).
        dropout: condition dropout probabilities.
        resolution: resize to this size (``None`` = as stored).
        depth_channels: channels the depth maps are repeated to (3, as the reference).
        tokenizer: optional CLIP tokenizer; adds ``input_ids``.
        compact: ship integer pixels (see :func:`to_device_batch`).
        quality_filter: optional :class:`triplets.quality.QualityFilter` applied to each decoded sample's json.
    """

    def __init__(self, urls: Sequence[str], *, batch_size: int, batches_per_epoch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                 dropout: ConditionDropout = ConditionDropout(), resolution: int | None = None,
                 depth_channels: int = 3, tokenizer=None, quality_filter=None, compact: bool = False) -> None:
        super().__init__()
        self.compact = compact
        self.quality_filter = quality_filter or None
        if batch_size < 1 or batches_per_epoch < 1:
            raise ValueError(f"batch_size ({batch_size}) and batches_per_epoch ({batches_per_epoch}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.urls = list(urls)
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.dropout = shuffle_buffer, dropout
        self.resolution, self.depth_channels, self.tokenizer = resolution, depth_channels, tokenizer
        self.set_position(0)

    def set_position(self, epoch: int, first_worker: int = 0, workers: dict[int, dict] | None = None) -> None:
        """Where the next iteration starts: ``epoch``; physical worker 0 plays virtual worker ``first_worker``;
        ``workers[v] = {"pos", "batches", "errors"}`` is what virtual worker ``v`` already delivered this epoch."""
        self.epoch, self.first_worker = epoch, first_worker
        self.workers = {int(k): dict(v) for k, v in (workers or {}).items()}

    # -- pieces of the worker pipeline
    def _shards_for(self, gid: int, total: int) -> tuple[list[str], tuple[int, int] | None]:
        """This worker's shards and, when there are too few shards to split, the sample slice ``(gid, total)``."""
        if len(self.urls) >= total:
            return self.urls[gid::total], None
        return self.urls, (gid, total)

    def _raw(self, shards: list[str], pass_seed: int, sample_slice, errors: _ErrorLog) -> Iterator[dict]:
        """Endless raw samples from seeded random passes over ``shards``."""
        rng = random.Random(pass_seed)
        index = 0
        while True:
            order = list(shards)
            rng.shuffle(order)
            produced = 0
            for url in order:
                for raw in _tar_samples(url, errors):
                    index += 1
                    if sample_slice is None or (index - 1) % sample_slice[1] == sample_slice[0]:
                        produced += 1
                        yield raw
            errors.pass_size = max(errors.pass_size, produced)
            if produced == 0:
                raise RuntimeError(f"a whole pass over {len(shards)} shard(s) gave no samples for this worker "
                                   f"(all corrupt or empty?); last error: {errors.last or 'none'}")

    def _decode(self, raw: dict, errors: _ErrorLog, drops: dict | None = None) -> dict | None:
        """The sample's tensors, or ``None`` when it is filtered out or does not decode (counted in ``errors``;
        ``drops[(url, key)]`` = the filter condition or ``"did not decode"``)."""
        where = (raw.get("__url__"), raw.get("__key__"))
        try:
            s = decode_sample({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
            problems = validate_sample(s)
            if problems:
                raise ValueError("; ".join(problems))
            why = self.quality_filter.reason(s.meta) if self.quality_filter is not None else None
            if why is not None:
                errors.filtered[why] += 1
                if drops is not None:
                    drops[where] = why
                return None
            return sample_to_tensors(s, self.resolution, self.depth_channels, self.compact)
        except Exception as exc:  # noqa: BLE001 - any undecodable sample is skipped and counted
            errors("sample", f"{raw.get('__url__')}#{raw.get('__key__')}", exc)
            if drops is not None:
                drops[where] = "did not decode"
            return None

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = get_worker_info()
        n_workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        v = (physical + self.first_worker) % n_workers  # virtual worker: what this process plays
        done = self.workers.get(v, {})
        start_pos, emitted = int(done.get("pos", 0)), int(done.get("batches", 0))
        errors = _ErrorLog(done.get("errors"), done.get("filtered"))
        total, gid = self.world_size * n_workers, self.rank * n_workers + v
        shards, sample_slice = self._shards_for(gid, total)
        pass_seed = _seed(self.seed, self.epoch, 1) if sample_slice else _seed(self.seed, self.epoch, gid, 2)
        raw = self._raw(shards, pass_seed, sample_slice, errors)
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, gid, 3))
            raw = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw)
        items: list[dict] = []
        if emitted >= self.batches_per_epoch:
            return
        streak = 0  # samples in a row that were dropped (filter) or skipped (undecodable)
        dropped: dict = {}  # (url, key) -> why, of this streak: each sample once, however many passes it spans
        for ordinal, sample in enumerate(raw):
            if ordinal < start_pos:
                continue  # consumed before the checkpoint (resume)
            item = self._decode(sample, errors, dropped)
            if item is None:
                streak += 1
                if errors.pass_size and streak > 2 * errors.pass_size + self.shuffle_buffer:
                    why = Counter(dropped.values())
                    undecodable = why.pop("did not decode", 0)
                    raise TrainingDataError(
                        f"no usable sample in a whole pass over {len(shards)} shard(s): all {len(dropped)} samples "
                        f"were dropped (data.filter: {dict(why) or 0}; {undecodable} did not decode); loosen "
                        f"data.filter ({self.quality_filter.describe() if self.quality_filter else 'none'})")
                continue
            streak = 0
            dropped.clear()
            items.append(apply_condition_dropout(
                item, self.dropout, np.random.default_rng(_seed(self.seed, self.epoch, gid, ordinal, 4))))
            if len(items) == self.batch_size:
                emitted += 1
                batch = collate(items, self.tokenizer, self.depth_channels)
                batch[META_KEY] = {"worker": v, "workers": n_workers, "epoch": self.epoch, "pos": ordinal + 1,
                                   "batches": emitted, "errors": dict(errors.counts), "last_error": errors.last,
                                   "filtered": dict(errors.filtered)}
                items = []
                yield batch
                if emitted >= self.batches_per_epoch:
                    return


# --------------------------------------------------------------------------------------------- main-process loader
def _ignore_sigint(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C so the training loop can finish its step and checkpoint (it owns the signal)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainDataLoader:
    """Endless iterator over :class:`TripletStream` epochs with an exact, checkpointable position.

    Each epoch builds a fresh ``wds.WebLoader`` (a ``DataLoader`` with ``batch_size=None``) over the stream; the
    DataLoader polls its workers round-robin, so batch ``k`` of an epoch comes from worker ``k % num_workers``. The
    position (per worker: raw samples consumed, batches delivered, errors seen) is updated as each batch is handed
    out, so :meth:`state_dict` after ``N`` batches describes exactly the ``N`` consumed batches. After
    :meth:`load_state_dict` the next epoch-loader maps physical worker 0 to the worker that was due next.

    Attributes:
        skipped: corrupt shards / bad samples skipped so far (``{"shard": n, "sample": m}``).
        filtered: samples dropped by the quality filter so far, by failed condition (``{"removal>=0.5": n}``).
    """

    def __init__(self, stream: TripletStream, *, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch, self.next_worker = 0, 0
        self.workers: dict[int, dict] = {}
        self.skipped: Counter = Counter()
        self.filtered: Counter = Counter()
        self.batches_per_epoch = stream.batches_per_epoch * max(1, num_workers)

    def _epoch_loader(self):
        import webdataset as wds

        self.stream.set_position(self.epoch, self.next_worker, self.workers)
        kwargs: dict[str, Any] = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                      worker_init_fn=_ignore_sigint if self.num_workers else None,
                                      # own generator: creating the iterator must not consume the global torch RNG
                                      # (it would shift the noise of a resumed run)
                                      generator=torch.Generator().manual_seed(0))
        if self.num_workers > 0 and self.prefetch_factor:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return wds.WebLoader(self.stream, **kwargs)

    def _consume(self, meta: dict) -> None:
        v = int(meta["worker"])
        old = Counter(self.workers.get(v, {}).get("errors", {}))
        new = Counter(meta["errors"])
        delta = new - old
        if delta:
            self.skipped.update(delta)
            logger.warning("data: skipped %s so far (latest: %s)",
                           ", ".join(f"{n} corrupt {k}(s)" for k, n in sorted(self.skipped.items())),
                           meta["last_error"])
        old_f, new_f = Counter(self.workers.get(v, {}).get("filtered", {})), Counter(meta.get("filtered", {}))
        self.filtered.update(new_f - old_f)
        self.workers[v] = {"pos": meta["pos"], "batches": meta["batches"], "errors": dict(new),
                           "filtered": dict(new_f)}
        self.next_worker = (v + 1) % int(meta["workers"])

    def __iter__(self) -> Iterator[dict]:
        while True:
            for batch in self._epoch_loader():
                self._consume(batch.pop(META_KEY))
                yield batch
            self.epoch, self.next_worker, self.workers = self.epoch + 1, 0, {}

    def state_dict(self) -> dict:
        """JSON-serialisable position (store one per rank)."""
        return {"epoch": self.epoch, "next_worker": self.next_worker, "num_workers": self.num_workers,
                "world_size": self.stream.world_size, "rank": self.stream.rank,
                "workers": {str(k): v for k, v in self.workers.items()}, "skipped": dict(self.skipped),
                "filtered": dict(self.filtered)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`; a different worker count or world size restarts the next epoch."""
        self.skipped = Counter(state.get("skipped", {}))
        self.filtered = Counter(state.get("filtered", {}))
        same = (state.get("num_workers") == self.num_workers and state.get("world_size") == self.stream.world_size)
        if same:
            self.epoch, self.next_worker = int(state["epoch"]), int(state["next_worker"])
            self.workers = {int(k): v for k, v in state.get("workers", {}).items()}
        else:
            logger.warning("data loader changed (workers %s -> %s, world size %s -> %s): the data stream restarts "
                           "at epoch %d instead of resuming mid-epoch", state.get("num_workers"), self.num_workers,
                           state.get("world_size"), self.stream.world_size, int(state["epoch"]) + 1)
            self.epoch, self.next_worker, self.workers = int(state["epoch"]) + 1, 0, {}


def make_dataloader(urls: str | Sequence[str], *, batch_size: int, num_workers: int = 0, rank: int = 0,
                    world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000,
                    epoch_samples: int | None = None, dropout: ConditionDropout = ConditionDropout(),
                    resolution: int | None = None, depth_channels: int = 3, tokenizer=None,
                    pin_memory: bool = False, quality_filter=None, compact: bool = False) -> TrainDataLoader:
    """Build the training loader over shard specs (see :func:`triplets.shardio.resolve_shards`).

    ``epoch_samples`` (default: the sum of the shards' marker counts, else 10,000) sets the nominal epoch:
    ``ceil(epoch_samples / (batch_size * world_size * workers))`` batches per worker, as ``with_epoch`` does.
    ``quality_filter`` (:class:`triplets.quality.QualityFilter`, from ``data.filter``) drops samples while streaming;
    the loader's ``filtered`` counts them. ``compact`` ships integer pixels, converted by :func:`to_device_batch`.
    """
    shard_urls = resolve_shards(urls, committed_only=True)
    if epoch_samples is None:
        epoch_samples = count_marked_samples(shard_urls)
        if epoch_samples is None:
            epoch_samples = 10_000
            logger.info("no sample counts in shard markers; nominal epoch = %d samples", epoch_samples)
    per_worker = max(1, math.ceil(epoch_samples / (batch_size * world_size * max(1, num_workers))))
    if len(shard_urls) < world_size * max(1, num_workers):
        logger.info("%d shards for %d ranks x %d workers: splitting by sample instead of by shard",
                    len(shard_urls), world_size, max(1, num_workers))
    stream = TripletStream(shard_urls, batch_size=batch_size, batches_per_epoch=per_worker, rank=rank,
                           world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer, dropout=dropout,
                           resolution=resolution, depth_channels=depth_channels, tokenizer=tokenizer,
                           quality_filter=quality_filter, compact=compact)
    if quality_filter:
        logger.info("data.filter: training on samples with %s", quality_filter.describe())
    return TrainDataLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


# ------------------------------------------------------------------------------------------ first samples, checks
def first_samples(urls: Sequence[str], n: int) -> list[TripletSample]:
    """The first ``n`` well-formed samples in shard order (fixed validation samples; skips bad ones)."""
    errors = _ErrorLog()
    out: list[TripletSample] = []
    for url in urls:
        for raw in _tar_samples(url, errors):
            try:
                s = decode_sample({k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"})
            except Exception as exc:  # noqa: BLE001
                errors("sample", f"{url}#{raw.get('__key__')}", exc)
                continue
            if not validate_sample(s):
                out.append(s)
            if len(out) >= n:
                return out
    return out


def preflight_check(urls: Sequence[str], *, max_shards: int = 2, strict: bool = False) -> list[str]:
    """Validate the first ``max_shards`` shards before training; returns the findings (one line each).

    Uses :func:`triplets.inspect.validate.validate` (readable to the end, every field present and well-typed, unique
    keys, markers agree); for ``pipe:`` shards, decodes the first samples of the first shard. Sample problems in
    intact shards (wrong format: the run would learn garbage or crash) always raise; shard problems (a
    truncated tar and its cut last sample, a marker mismatch) are warnings, since the loader skips corrupt data,
    unless ``strict``.

    Raises:
        TrainingDataError: listing the findings when the data cannot be trained on.
    """
    head = list(urls)[: max(1, max_shards)]
    fatal, findings = [], []
    if not any(u.startswith("pipe:") for u in head):
        from triplets.inspect.validate import validate

        result = validate(head, decode=True, max_problems=50)
        damaged = {s.path for s in result.shards if not s.complete}  # their last sample is cut: not a format error
        for p in result.problems:
            findings.append(str(p))
            if p.severity == "error" and (strict or (p.key is not None and p.path not in damaged)):
                fatal.append(str(p))
        if result.nsamples == 0:
            fatal.append(f"no readable samples in the first {len(head)} shard(s)")
    else:
        samples = first_samples(head[:1], 8)
        if not samples:
            fatal.append(f"no well-formed sample among the first of {head[0]}")
    for line in findings:
        logger.warning("preflight: %s", line)
    if fatal:
        raise TrainingDataError("training data failed the pre-flight check:\n" + "\n".join(fatal[:20]))
    return findings
