"""The CnC training loop on Hugging Face accelerate (one function for 1 GPU, ``accelerate launch``, torchrun, Ray).

Run::

    cnc train --config configs/train/local.yaml --set data.train_shards=out/build --set output_dir=out/train-local
    accelerate launch --num_processes 8 -m cnc_model.training --config configs/train/global.yaml ...
    torchrun --nproc_per_node 8 -m cnc_model.training --config configs/train/joint.yaml ...

Per optimizer step (as the reference implementation): VAE latents -> noise, t ~ U[0, 1000), ``add_noise`` -> CLIP text
states -> [global tokens] -> [local fuser residuals] -> frozen UNet (encoder/middle under no_grad) -> ε-MSE in fp32.
Only the stage's fusers are prepared by accelerate (DDP-wrapped, fp32, autocast); VAE, text encoder and UNet are
frozen in ``mixed_precision`` dtype and never checkpointed.

Size: the training loop is kept visible in one place on purpose (nanoGPT-style); setup, step, checkpoint and resume
share the accelerator state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cnc.base.errors import UserError
from cnc.config import config_dict, save_config
from cnc.progress import StepProgress
from cnc_model.training import checkpointing as ckpt
from cnc_model.training import provenance as prov
from cnc_model.training.components import Components, load_components, resolve_base
from cnc_model.training.config import TrainConfig

logger = logging.getLogger(__name__)
#: Test-only fault injection (JSON): ``{"step_delay_s": S}`` sleeps S seconds after every optimizer step (kill tests).
FAULT_ENV = "CNC_TEST_FAULT_INJECTION"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What :func:`train` returns (per process)."""

    global_step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step of this run (this process's batches)
    interrupted: bool = False
    signal: int | None = None  # the signal that stopped this process (SIGINT/SIGTERM), None without one
    checkpoints: list[str] = field(default_factory=list)
    validation_images: list[str] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    filtered: dict = field(default_factory=dict)  # samples dropped by data.filter, by failed condition


class Trainer:
    """One training run. ``Trainer(cfg).train()``; tests may inject ``components`` (tiny models).

    Args:
        cfg: the validated config.
        components: prebuilt models (default: :func:`~cnc_model.training.components.load_components`).
        step_callback: called as ``step_callback(trainer, global_step)`` after every optimizer step (tests use it
            to send SIGINT at a known step).
    """

    def __init__(self, cfg: TrainConfig, components: Components | None = None,
                 step_callback: Callable[[Trainer, int], None] | None = None) -> None:
        self.cfg = cfg
        self.components = components
        self.step_callback = step_callback
        self.global_step = 0
        self._stop = False
        self._stop_signal: int | None = None  # the first SIGINT/SIGTERM this process received
        self._step_delay = float(json.loads(os.environ.get(FAULT_ENV) or "{}").get("step_delay_s", 0.0))

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Accelerator, data, models, optimizer, LR schedule, checkpoint hooks, trackers (in that order)."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg, out = self.cfg, self.cfg.output_path  # the local folder written (a mirror of an object-store output)
        self.storage = cfg.run_storage()
        # 0. fail fast on a missing base model and on impossible settings
        base = resolve_base(cfg) if self.components is None else None
        self.provenance = prov.training_provenance(cfg, base)
        use_cpu = cfg.train.cpu or not torch.cuda.is_available()
        if use_cpu and cfg.train.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
        # 1. accelerator and seeds (the same seed on every rank: identical init; data differ by rank)
        _reset_accelerator_state()
        from cnc_model.training.config import check_tracker

        check_tracker(cfg.train.report_to)  # one line naming the missing package, before anything starts
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            mixed_precision=cfg.train.mixed_precision, cpu=use_cpu,
            log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
        acc = self.accelerator
        self.weight_dtype = WEIGHT_DTYPES[cfg.train.mixed_precision]
        set_seed(cfg.seed)
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # 2. data: pre-flight check, fixed validation samples, loader (before anything is created: a wrong shard
        # path must not leave an empty output_dir behind)
        self._setup_data()
        cfg = self.cfg  # train.num_train_epochs resolved into train.max_train_steps
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg.model_copy(update={"provenance": self.provenance}), out / "train_config.yaml")
            self.storage.sync()
        self._check_shared_output()

        # 3. models
        comps = self.components or load_components(cfg, self.image_embed_dim)
        self.components = comps
        self._setup_models(comps)

        # 4. optimizer + LR schedule; prepare only the trainables (an unused prepared module breaks DDP)
        self.trainable_names = list(comps.trainables())
        modules = list(comps.trainables().values())
        self.optimizer = self._make_optimizer([p for m in modules for p in m.parameters()])
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            cfg.optim.lr_scheduler, optimizer=self.optimizer,
            num_warmup_steps=cfg.optim.lr_warmup_steps * acc.num_processes,
            num_training_steps=cfg.train.max_train_steps * acc.num_processes)
        prepared = acc.prepare(*modules, self.optimizer, lr_scheduler)
        self.models = dict(zip(self.trainable_names, prepared[: len(modules)]))
        self.optimizer, self.lr_scheduler = prepared[len(modules):]
        self.params = [p for m in self.models.values() for p in m.parameters()]
        ckpt.register_fuser_hooks(acc, self.trainable_names)
        self.ema = self._make_ema()
        self._decide_checkpointing()

        # 5. resume, trackers
        self.resume()
        if acc.is_main_process and cfg.train.report_to != "none":
            flat = {f"{sec}.{k}": v for sec, d in config_dict(cfg).items() if isinstance(d, dict) for k, v in d.items()
                    if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("cnc-train", config={"stage": cfg.stage, **flat})

    def _setup_data(self) -> None:
        from cnc_model import data
        from triplets.shardio import resolve_shards

        cfg, acc = self.cfg, self.accelerator
        if not cfg.data.train_shards:
            raise ValueError("data.train_shards is empty: set it to a build output folder, glob or shard URLs")
        urls = resolve_shards(cfg.data.train_shards, committed_only=True)
        self.shard_urls = urls
        if cfg.data.preflight_shards:
            data.preflight_check(urls, max_shards=cfg.data.preflight_shards, strict=cfg.data.preflight_strict)
        first = data.first_samples(urls, 1)
        if not first:
            raise ValueError(f"no readable sample in {len(urls)} shard(s)")
        self.image_embed_dim = cfg.model.image_embed_dim or int(first[0].fg_emb.shape[0])
        self.resolution = cfg.data.resolution or int(first[0].image.shape[0])
        self.validation_samples = []
        if acc.is_main_process and cfg.validation.num_samples:
            val_urls = resolve_shards(cfg.validation.shards, committed_only=True) if cfg.validation.shards else urls
            self.validation_samples = data.first_samples(val_urls, cfg.validation.num_samples)
        dropout = data.ConditionDropout.for_stage(
            cfg.stage, caption=cfg.data.drop_caption_prob,
            depth=0.1 if cfg.data.drop_depth_prob is None else cfg.data.drop_depth_prob,
            embedding=0.1 if cfg.data.drop_embedding_prob is None else cfg.data.drop_embedding_prob)
        self.loader = data.make_dataloader(
            urls, batch_size=cfg.train.train_batch_size, num_workers=cfg.data.num_workers,
            rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer, epoch_samples=cfg.data.epoch_samples, dropout=dropout,
            resolution=self.resolution, depth_channels=cfg.data.depth_channels,
            pin_memory=acc.device.type == "cuda", quality_filter=cfg.data.filter.build(), compact=True)
        logger.info("data: %d shards, %d batches of %d per process and epoch, dropout %s", len(urls),
                    self.loader.batches_per_epoch, cfg.train.train_batch_size, dropout)
        self._resolve_length()

    def _resolve_length(self) -> None:
        """``train.num_train_epochs`` → ``train.max_train_steps`` (this run's data, batch and processes), written into
        the config the run saves; without it the configured steps stand."""
        t = self.cfg.train
        if t.num_train_epochs is None:
            return

        steps = max(1, math.ceil(t.num_train_epochs * self.loader.batches_per_epoch / t.gradient_accumulation_steps))
        if "max_train_steps" in t.model_fields_set and t.max_train_steps != steps:
            logger.info("train.max_train_steps=%d replaced by train.num_train_epochs", t.max_train_steps)
        logger.info("train.num_train_epochs=%g: %d optimizer steps (%d batches of %d per process and epoch, %d "
                    "processes, accumulation %d)", t.num_train_epochs, steps, self.loader.batches_per_epoch,
                    t.train_batch_size, self.accelerator.num_processes, t.gradient_accumulation_steps)
        self.cfg = self.cfg.model_copy(update={"train": t.model_copy(update={"max_train_steps": steps})})

    def _setup_models(self, comps: Components) -> None:
        from cnc_model.attention import install_soft_guidance

        cfg, device = self.cfg, self.accelerator.device
        for frozen in (comps.vae, comps.text_encoder, comps.unet):
            frozen.requires_grad_(False)
            frozen.eval()
            frozen.to(device=device, dtype=self.weight_dtype)
        for name, module in comps.trainables().items():
            module.to(device)
            module.train()
            module.requires_grad_(True)
            bad = {p.dtype for p in module.parameters()} - {torch.float32}
            if bad:
                raise ValueError(f"{name}: trainable weights must stay fp32, found {bad}")
        # Every attention layer gets the soft-guidance processor: the `local` stage has 0 global tokens (text only)
        # and never passes a mask, so it computes plain SDPA attention there.
        n_tokens = comps.global_fuser.config.tokens_per_reference if comps.global_fuser is not None else (
            cfg.model.tokens_per_reference if cfg.stage != "local" else 0)
        install_soft_guidance(comps.unet, comps.local_fuser, num_text_tokens=comps.tokenizer.model_max_length,
                              tokens_per_reference=n_tokens, resize_mode=cfg.model.soft_guidance_resize,
                              fp32_logits=cfg.model.attention_fp32_logits)
        if cfg.train.gradient_checkpointing is True:
            enable_checkpointing(comps)

    def _decide_checkpointing(self) -> None:
        """``train.gradient_checkpointing: auto``: one forward + backward of a real batch without checkpointing,
        measured on the device (:mod:`cnc_model.training.memory`); every process follows the most demanding one."""
        from cnc_model.training.memory import CheckpointingDecision, checkpointing_decision

        setting, acc = self.cfg.train.gradient_checkpointing, self.accelerator
        if setting != "auto":
            self.checkpointing = CheckpointingDecision(bool(setting), "set in the config")
            return

        def step() -> None:  # what _micro_step runs, without the optimizer step, gradient sync or RNG draws
            batch = self._probe_batch()
            with ExitStack() as stack, torch.random.fork_rng(devices=self._rng_devices()):
                for m in self.models.values():
                    stack.enter_context(acc.no_sync(m))
                acc.backward(self.compute_loss(batch))
            self.optimizer.zero_grad(set_to_none=True)

        decision = checkpointing_decision(acc.device, step, self.params,
                                          "adamw8bit" if self.cfg.optim.use_8bit_adam else "adamw")
        if acc.num_processes > 1:
            needed = acc.reduce(torch.tensor(float(decision.enabled), device=acc.device), "sum").item() > 0
            if needed != decision.enabled:
                decision = CheckpointingDecision(needed, "another process needs it", decision.peak_bytes,
                                                 decision.optimizer_state_bytes, decision.budget_bytes)
        if decision.enabled:
            enable_checkpointing(self.components)
        logger.info("gradient checkpointing %s (auto): %s", "on" if decision.enabled else "off", decision.reason)
        self.checkpointing = decision

    def _probe_batch(self) -> dict:
        """A batch of the loader's shape and fields from the first samples (the data stream is not touched)."""
        from cnc_model import data

        samples = data.first_samples(self.shard_urls, self.cfg.train.train_batch_size)
        samples = (samples * self.cfg.train.train_batch_size)[:self.cfg.train.train_batch_size]
        return data.collate([data.sample_to_tensors(s, self.resolution, self.cfg.data.depth_channels, compact=True)
                             for s in samples], self.components.tokenizer, self.cfg.data.depth_channels)

    def _rng_devices(self) -> list:
        return [self.accelerator.device] if self.accelerator.device.type == "cuda" else []

    def _make_optimizer(self, params):
        o = self.cfg.optim
        lr = o.learning_rate
        if o.scale_lr:
            lr *= (self.cfg.train.gradient_accumulation_steps * self.cfg.train.train_batch_size
                   * self.accelerator.num_processes)
        cls, extra = torch.optim.AdamW, {}
        if o.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optim.use_8bit_adam needs bitsandbytes: pip install bitsandbytes "
                                  "(or pip install 'cnc[bnb]'), or set optim.use_8bit_adam=false") from None
            cls = bnb.optim.PagedAdamW8bit if self.accelerator.num_processes > 1 else bnb.optim.AdamW8bit
        elif o.fused if o.fused is not None else torch.device(self.accelerator.device).type == "cuda":
            extra["fused"] = True  # one kernel per step (auto: on CUDA)
        return cls(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay,
                   eps=o.adam_epsilon, **extra)

    def _make_ema(self) -> dict:
        if not self.cfg.train.use_ema:
            return {}
        from diffusers.training_utils import EMAModel

        emas = {}
        for name, model in self.models.items():
            base = self.accelerator.unwrap_model(model)
            emas[name] = EMAModel(base.parameters(), decay=self.cfg.train.ema_decay, model_cls=type(base),
                                  model_config=base.config)
        # EMA weights go into the checkpoint as safetensors folders (``ema_<name>/``), not as the pickle that
        # ``register_for_checkpointing`` writes and reloads with ``weights_only=False``.
        acc = self.accelerator

        # Both build a throw-away module (random init): fork the RNG so a checkpoint never shifts the training noise.
        def save_ema(models, weights, output_dir) -> None:
            if acc.is_main_process:
                with torch.random.fork_rng():
                    for name, ema in emas.items():
                        ema.save_pretrained(str(Path(output_dir) / f"ema_{name}"))

        def load_ema(models, input_dir) -> None:
            with torch.random.fork_rng():
                for name, ema in emas.items():
                    loaded = EMAModel.from_pretrained(str(Path(input_dir) / f"ema_{name}"), model_cls=ema.model_cls)
                    ema.load_state_dict(loaded.state_dict())

        acc.register_save_state_pre_hook(save_ema)
        acc.register_load_state_pre_hook(load_ema)
        return emas

    # ------------------------------------------------------------------------------------------------ step
    def sample_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ε ~ N(0, I) like ``latents`` (+ optional offset noise) and t ~ U{0, ..., T-1} per sample."""
        noise = torch.randn_like(latents)
        if self.cfg.train.noise_offset:
            noise += self.cfg.train.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        num_t = self.components.noise_scheduler.config.num_train_timesteps
        return noise, torch.randint(0, num_t, (latents.shape[0],), device=latents.device).long()

    def image_latents(self, batch: dict) -> torch.Tensor:
        """Unscaled VAE latents ``(B, 4, R/8, R/8)`` float32 of the batch's images: drawn from the shards' stored
        distribution (:func:`cnc_model.data.sample_latents`) when ``data.use_latents`` is true, or when it is null
        (auto) and the batch carries it at the training size; else encoded now."""
        from cnc_model.data import TrainingDataError, sample_latents

        comps, dev, mode = self.components, self.accelerator.device, self.cfg.data.use_latents
        dist = batch.get("latent_dist")
        factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        want = tuple(s // factor for s in batch["pixel_values"].shape[-2:])
        if mode:
            if dist is None:
                raise TrainingDataError("data.use_latents: the shards have no latent.npy (build them with "
                                        "latents.enabled: true, latents.resolution = data.resolution)")
            if tuple(dist.shape[-2:]) != want:
                raise TrainingDataError(f"data.use_latents: latent.npy is {tuple(dist.shape[-2:])}, the training "
                                        f"resolution needs {want} (build with latents.resolution = data.resolution)")
        if mode or (mode is None and dist is not None and tuple(dist.shape[-2:]) == want):
            return sample_latents(dist.to(dev))
        pixels = batch["pixel_values"].to(dev, dtype=self.weight_dtype)
        return torch.cat([comps.vae.encode(chunk).latent_dist.sample() for chunk in pixels.split(8)]).float()

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """MSE of one batch against the scheduler's target (ε by default); the forward is :class:`CnCDenoiser`'s.

        Soft guidance follows the denoiser's one rule: on whenever the stage trains a global fuser.
        """
        from cnc_model.data import to_device_batch, tokenize
        from cnc_model.denoiser import CnCDenoiser, training_target

        comps, dev, wdt = self.components, self.accelerator.device, self.weight_dtype
        batch = to_device_batch(batch, dev, self.cfg.data.depth_channels, non_blocking=True)  # every tensor on dev
        with torch.no_grad():
            latents = self.image_latents(batch) * comps.vae.config.scaling_factor
            ids = batch["input_ids"] if "input_ids" in batch else tokenize(comps.tokenizer, batch["captions"])
            text = comps.text_encoder(ids.to(dev))[0].to(wdt)  # (B, 77, D); ids tokenized here are on the CPU
        sched = comps.noise_scheduler
        noise, t = self.sample_noise(latents)
        noisy = sched.add_noise(latents, noise, t)

        denoiser = CnCDenoiser(comps.unet, self.models.get("local_fuser"), self.models.get("global_fuser"),
                               frozen_encoder_no_grad=self.cfg.model.frozen_encoder_no_grad)
        emb = {k: batch[k] for k in ("fg_emb", "bg_emb")} if denoiser.global_fuser is not None else {}
        context = denoiser.build_context(text, emb.get("fg_emb"), emb.get("bg_emb"))  # (B, 77 [+ 2N], D)
        pred = denoiser.predict_noise(noisy, t, context, batch["fg_depth"], batch["bg_depth"], mask=batch["mask"])
        target = training_target(sched, latents, noise, t)
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        """Run until ``max_train_steps`` or SIGINT/SIGTERM; returns a :class:`TrainResult`."""
        if not hasattr(self, "accelerator"):
            self.setup()
        cfg, acc = self.cfg, self.accelerator
        result = TrainResult(global_step=self.global_step)
        max_steps, accum = cfg.train.max_train_steps, cfg.train.gradient_accumulation_steps
        per_step = cfg.train.train_batch_size * accum * acc.num_processes
        logger.info("stage %s: %d -> %d steps, %d images per step (%d x %d accumulation x %d processes), lr %.2e",
                    cfg.stage, self.global_step, max_steps, per_step, cfg.train.train_batch_size, accum,
                    acc.num_processes, self.optimizer.param_groups[0]["lr"])
        progress = self._progress_bar(per_step)
        keys_file = self._keys_file()
        data_iter = iter(self.loader)
        window = {"loss": 0.0, "steps": 0, "t0": time.perf_counter()}
        step_loss, pending = 0.0, []  # step losses stay on the device until the next log step (one sync per log)
        stop = False
        with self._signal_guard():
            while self.global_step < max_steps and not stop:
                batch = next(data_iter)  # loader workers ignore SIGINT: Ctrl-C reaches only this loop
                if keys_file is not None:
                    keys_file.write("".join(k + "\n" for k in batch["keys"]))
                step_loss = step_loss + self._micro_step(batch) / accum  # a device tensor: no host sync here
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                for name, ema in self.ema.items():
                    ema.step(acc.unwrap_model(self.models[name]).parameters())
                pending.append(step_loss)
                window["steps"] += 1
                progress.update(1, lr=self.lr_scheduler.get_last_lr()[0])  # the loss arrives at the next flush
                step_loss = 0.0
                if self.global_step % cfg.train.log_every == 0 or self.global_step == max_steps:
                    self._flush_losses(pending, result, window, progress)
                    self._log(window, per_step)
                if self.step_callback is not None:
                    self.step_callback(self, self.global_step)
                if self._step_delay:
                    time.sleep(self._step_delay)
                stop = self._stop_requested()  # agreed by all ranks: they all leave after the same step
                if stop:
                    break
                if self.global_step % cfg.train.checkpointing_steps == 0:
                    result.checkpoints.append(str(self.save_checkpoint()))
                if cfg.validation.steps and self.global_step % cfg.validation.steps == 0:
                    self._maybe_validate(result)
        self._flush_losses(pending, result, window, progress)
        progress.close()
        if keys_file is not None:
            keys_file.close()
        result.interrupted = stop
        if stop:  # a rank stopped by the others' signal reports SIGTERM (what the launcher sends to every rank)
            result.signal = self._stop_signal or int(signal.SIGTERM)
        self._finish(result)
        result.global_step, result.skipped = self.global_step, dict(self.loader.skipped)
        result.filtered = dict(self.loader.filtered)
        if result.filtered:
            logger.info("data.filter dropped %d samples: %s", sum(result.filtered.values()), result.filtered)
        return result

    def _micro_step(self, batch: dict) -> torch.Tensor:
        """Forward + backward of one batch; the optimizer steps when accumulation is complete. Returns the detached
        loss on the device (no host sync)."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(*self.models.values()):
            loss = self.compute_loss(batch)
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.max_grad_norm:
                acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
            self.optimizer.step()  # accelerate skips it (and the scheduler) until accumulation is complete
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=cfg.train.set_grads_to_none)
        return loss.detach()

    def _flush_losses(self, pending: list, result: TrainResult, window: dict, progress) -> None:
        """Move the step losses kept on the device to ``result.losses`` and the log window (one host sync)."""
        if not pending:
            return
        values = [float(v) for v in torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in pending]).tolist()]
        pending.clear()
        result.losses.extend(values)
        window["loss"] += sum(values)
        progress.set_fields(loss=values[-1])

    def _finish(self, result: TrainResult) -> None:
        acc, cfg = self.accelerator, self.cfg
        last = ckpt.checkpoint_dir(cfg.output_path, self.global_step)
        if self.global_step > 0 and not (last / ckpt.TRAINER_STATE).is_file():
            result.checkpoints.append(str(self.save_checkpoint()))
        if result.interrupted:
            logger.warning("interrupted at step %d; checkpoint %s written. Continue with --resume latest",
                           self.global_step, last)
            acc.end_training()
            return
        acc.wait_for_everyone()
        if acc.is_main_process:
            with self._ema_weights():
                for name, model in self.models.items():
                    acc.unwrap_model(model).save_pretrained(cfg.output_path / name)
            logger.info("saved %s to %s", ", ".join(self.models), cfg.output_path)
        if cfg.validation.num_samples and (not cfg.validation.steps or self.global_step % cfg.validation.steps):
            self._maybe_validate(result)
        acc.end_training()
        if acc.is_main_process:
            self.storage.sync()  # final fusers, validation images, logs

    # ------------------------------------------------------------------------------------------------ helpers
    def _log(self, window: dict, per_step: int) -> None:
        acc = self.accelerator
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        loss = torch.tensor(window["loss"] / max(1, window["steps"]), device=acc.device)
        loss = acc.reduce(loss, "mean").item() if acc.num_processes > 1 else loss.item()
        logs = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0],
                "samples_per_s": window["steps"] * per_step / elapsed,
                "data/skipped_shards": self.loader.skipped.get("shard", 0),
                "data/skipped_samples": self.loader.skipped.get("sample", 0),
                "data/filtered": sum(self.loader.filtered.values()),
                **{f"data/filtered/{why}": n for why, n in self.loader.filtered.items()}}
        if torch.cuda.is_available():
            logs["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        acc.log(logs, step=self.global_step)
        logger.debug("step %d %s", self.global_step, logs)
        window.update(loss=0.0, steps=0, t0=time.perf_counter())

    def _progress_bar(self, per_step: int):
        """A tqdm bar on a terminal; in job logs one line (step, loss, lr, samples/s, ETA) every
        ``train.progress_interval_s`` seconds or ``train.log_every`` steps (:class:`cnc.progress.StepProgress`)."""
        t = self.cfg.train
        return StepProgress(t.max_train_steps, initial=self.global_step, desc=f"train {self.cfg.stage}",
                            enabled=self.accelerator.is_local_main_process and t.progress_bar,
                            interval_s=t.progress_interval_s, every_steps=t.log_every, samples_per_step=per_step)

    def _keys_file(self):
        if not self.cfg.train.record_keys:
            return None
        path = self.cfg.output_path / "keys" / f"rank-{self.accelerator.process_index}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")

    @contextmanager
    def _ema_weights(self):
        """Temporarily swap EMA weights into the live modules (no-op without EMA)."""
        for name, ema in self.ema.items():
            params = list(self.accelerator.unwrap_model(self.models[name]).parameters())
            ema.store(params)
            ema.copy_to(params)
        try:
            yield
        finally:
            for name, ema in self.ema.items():
                ema.restore(self.accelerator.unwrap_model(self.models[name]).parameters())

    def _maybe_validate(self, result: TrainResult) -> None:
        if self.accelerator.is_main_process and self.validation_samples:
            result.validation_images.append(str(self.validate()))

    def validate(self) -> Path:
        """Generate the validation grid with the current (EMA) weights; training RNG and modes are untouched."""
        from cnc_model.training.validation import run_validation, save_and_log

        comps, cfg, acc = self.components, self.cfg, self.accelerator
        live = {name: acc.unwrap_model(m) for name, m in self.models.items()}
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self._ema_weights():
            for m in live.values():
                m.eval()
            try:
                autocast = acc.autocast() if self.weight_dtype != torch.float32 else nullcontext()
                with autocast:
                    grid = run_validation(
                        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
                        noise_scheduler=comps.noise_scheduler, local_fuser=live.get("local_fuser"),
                        global_fuser=live.get("global_fuser"), samples=self.validation_samples,
                        resolution=self.resolution, num_inference_steps=cfg.validation.num_inference_steps,
                        guidance_scale=cfg.validation.guidance_scale, seed=cfg.validation.seed)
            finally:
                for m in live.values():
                    m.train()
        return save_and_log(grid, cfg.output_path, self.global_step, acc)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """``checkpoint-<step>``: fusers + accelerate state + per-rank data position; rotates old ones.

        Staged: every rank writes into ``checkpoint-<step>.partial/``, the main process adds ``trainer_state.json``
        last and renames the folder, so a failed write (disk full, quota, preemption) never leaves a half checkpoint
        under the final name and the previous checkpoint stays the one ``--resume latest`` finds. A failure raises
        :class:`~cnc_model.training.checkpointing.CheckpointWriteError` (one line: what, where, why).
        """
        acc, cfg = self.accelerator, self.cfg
        path = ckpt.checkpoint_dir(cfg.output_path, self.global_step)
        staging = ckpt.staging_dir(path)
        if acc.is_main_process:
            ckpt.discard(staging)  # leftovers of an earlier failed save of this step
        acc.wait_for_everyone()
        with ckpt.staged_write(path, staging):
            acc.save_state(str(staging))
            ckpt.write_json(ckpt.data_state_path(staging, acc.process_index), self.loader.state_dict())
        acc.wait_for_everyone()
        if acc.is_main_process:
            with ckpt.staged_write(path, staging):
                prov.write_checkpoint_provenance(staging, self.provenance)
                ckpt.write_json(staging / ckpt.TRAINER_STATE, {
                    "global_step": self.global_step, "stage": cfg.stage, "num_processes": acc.num_processes,
                    "train_batch_size": cfg.train.train_batch_size,
                    "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps})
                ckpt.publish(staging, path)
            logger.info("saved %s", path)
            ckpt.rotate_checkpoints(cfg.output_path, cfg.train.checkpoints_total_limit)  # only once it is complete
            self.storage.push_checkpoint(path)  # trainer_state.json last: complete on the store too
            self.storage.prune_checkpoints(cfg.train.checkpoints_total_limit)
            self.storage.sync()
        acc.wait_for_everyone()
        return path

    def _check_shared_output(self) -> None:
        """Multi-process runs on a local output: every process must see the folder the main process writes."""
        acc = self.accelerator
        if acc.num_processes < 2 or self.storage.remote:
            return
        probe = self.cfg.output_path / ".probe-train"
        if acc.is_main_process:
            probe.write_text("probe")
        acc.wait_for_everyone()
        seen = probe.is_file()
        acc.wait_for_everyone()
        if acc.is_main_process:
            probe.unlink(missing_ok=True)
        if not seen:
            raise UserError(f"output_dir {self.cfg.output_dir} is not visible from process {acc.process_index}: on "
                            f"several nodes it must be shared storage every node mounts, or an object-store URL")

    def resume(self) -> int:
        """Load ``train.resume_from_checkpoint`` (``latest`` or a path); returns the step to continue from."""
        acc, cfg = self.accelerator, self.cfg
        spec = cfg.train.resume_from_checkpoint
        if spec and self.storage.remote:  # bring the checkpoint from the object store into the local mirror
            if acc.is_local_main_process:
                self.storage.pull_checkpoint(None if spec == "latest" else Path(spec).name)
            acc.wait_for_everyone()
        path = None
        for candidate in ckpt.resume_candidates(cfg.output_path, cfg.train.resume_from_checkpoint):
            state = ckpt.read_json(candidate / ckpt.TRAINER_STATE)
            if state.get("stage") not in (None, cfg.stage):
                raise UserError(f"checkpoint {candidate} is from stage {state['stage']!r}, this run is {cfg.stage!r}")
            prov.check_resume(candidate, self.provenance)  # a changed base model is refused, not resumed
            try:
                acc.load_state(str(candidate))
                data_file = ckpt.data_state_path(candidate, acc.process_index)
                data_state = ckpt.read_json(data_file) if data_file.is_file() else None
            except (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
                logger.warning("checkpoint %s does not load (%s: %s): falling back to the previous complete one",
                               candidate, type(exc).__name__, exc)
                continue
            path = candidate
            break
        if path is None:
            if cfg.train.resume_from_checkpoint:
                logger.info("no loadable checkpoint in %s: starting from scratch", cfg.output_path)
            return 0
        rng_problem = ckpt.rng_state_problem(path, acc.process_index)
        if rng_problem:
            logger.error("RNG state NOT restored: %s; training continues with fresh random streams, so this resume "
                         "is not bit-identical to an uninterrupted run", rng_problem)
        self.global_step = int(state["global_step"])
        if data_state is not None:
            self.loader.load_state_dict(data_state)
        else:
            logger.warning("%s has no data position for rank %d: the data stream restarts", path,
                           acc.process_index)
        logger.info("resumed from %s at step %d", path, self.global_step)
        return self.global_step

    # ------------------------------------------------------------------------------------------------ Ctrl-C
    @contextmanager
    def _signal_guard(self):
        """SIGINT (Ctrl-C) / SIGTERM (preemption): finish the step, save a checkpoint, exit cleanly.

        A second signal gets the default behaviour (abort). Not installed off the main thread (e.g. Ray workers).
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.getsignal(sig) for sig in signals}

        def handler(signum, frame):
            logger.warning("%s received: saving a checkpoint after this step (send it again to abort)",
                           signal.Signals(signum).name)
            self._stop = True
            self._stop_signal = self._stop_signal or int(signum)
            signal.signal(signum, previous[signum])

        for sig in signals:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig in signals:
                signal.signal(sig, previous[sig])

    def _stop_requested(self) -> bool:
        """Whether any process was signalled (a collective under several processes, called by all at each step)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._stop
        flag = torch.tensor(float(self._stop), device=acc.device)
        return bool(acc.reduce(flag, "sum").item() > 0)


def enable_checkpointing(comps: Components) -> None:
    """Gradient checkpointing of the modules on the gradient path: the frozen UNet (its decoder) and the local fuser."""
    comps.unet.enable_gradient_checkpointing()
    if comps.local_fuser is not None:
        comps.local_fuser.enable_gradient_checkpointing()


def _reset_accelerator_state() -> None:
    """Let a second run in the same process (tests, notebooks) use other accelerator settings.

    Only the per-run ``AcceleratorState`` (mixed precision, plugins) is reset; the process/distributed state stays.
    """
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if reset is not None:
        reset()


def train(cfg: TrainConfig, components: Components | None = None, step_callback=None) -> TrainResult:
    """Train one stage as configured (the entry point of ``cnc train``, ``accelerate launch``, torchrun and Ray)."""
    return Trainer(cfg, components, step_callback).train()
