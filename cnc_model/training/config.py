"""Typed configuration of ``cnc train`` (``configs/train/*.yaml``), validated once and saved beside the outputs.

Stages: ``local`` trains the local fuser with the 77-token text context (no global tokens, no mask);
``global`` trains the global fuser with soft guidance (85 tokens + mask in every UNet cross-attention); ``joint``
trains both, initialised from the two earlier runs (``model.local_fuser`` / ``model.global_fuser``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cnc.base.errors import UserError
from cnc.config import FINITE_FLOATS, MAX_RESOLUTION, ConfigError, GuidanceScale, Seed, Steps, load_config
from cnc.hub import TINY
from cnc_model.training.run_storage import RunStorage
from triplets.quality_filter import FilterConfig

STAGES = ("local", "global", "joint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), **FINITE_FLOATS)


class ModelConfig(_Strict):
    """Base model and fuser initialisation."""

    pretrained_model_name_or_path: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="diffusers SD 1.5 folder or hub id (subfolders unet, vae, text_encoder, tokenizer, scheduler); "
                    "'tiny' = seeded random tiny models (tests, demo)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of the base model")
    variant: str | None = Field(None, description="weights variant of the base model, e.g. fp16")
    unet: str | None = Field(
        None, description="a saved diffusers UNet folder (config.json + weights) used as the frozen UNet instead of "
                          "the base model's unet/: e.g. the UNet a reference checkpoint holds, written by `cnc "
                          "convert-reference CKPT -o OUT --base-model SD --save-unet` (OUT/unet), so the fusers train "
                          "against exactly the UNet the reference's fusers were trained against")
    local_fuser: str | None = Field(
        None, description="folder with a saved LocalFuser (config.json + safetensors) to start from; "
                          "default: LocalFuser.from_unet(unet)")
    local_fuser_init: str = Field(
        "from_unet", description="fresh local fuser when model.local_fuser is unset: 'from_unet' (copy of the SD "
                                 "encoder, new FDN/extractor/zero convs) or the path of a reference checkpoint with "
                                 "a local adapter, e.g. Uni-ControlNet's uni.ckpt (the reference's stage-1 init)")
    global_fuser: str | None = Field(None, description="folder with a saved GlobalFuser to start from; default: "
                                                       "random init")
    image_embed_dim: int | None = Field(None, ge=1, description="CLIP embedding width; default: from the data")
    tokens_per_reference: int = Field(4, ge=1, description="global tokens per reference image (N)")
    soft_guidance_resize: Literal["reference", "nearest", "area"] = Field(
        "reference", description="how the mask M is resized to each attention resolution: reference = bicubic, "
                                 "nonzero is foreground (the reference's); nearest / area = threshold 0.5")
    attention_fp32_logits: bool = Field(
        False, description="compute attention logits in fp32 when the frozen parts run in bf16/fp16 (the reference's "
                           "fp32 attention precision)")
    frozen_encoder_no_grad: bool = Field(
        True, description="frozen UNet encoder + middle block under no_grad (reference); false = full graph")

    @model_validator(mode="after")
    def _one_local_init(self) -> ModelConfig:
        if self.local_fuser and self.local_fuser_init != "from_unet":
            raise ValueError("set model.local_fuser (a saved fuser) or model.local_fuser_init (a reference "
                             "checkpoint), not both")
        return self


class DataConfig(_Strict):
    """Shards and the streaming loader (``cnc_model.data``)."""

    train_shards: list[str] = Field(default_factory=list, description="shard paths / globs / brace patterns / "
                                    "build folders / remote URLs")
    resolution: int | None = Field(512, ge=8, le=MAX_RESOLUTION, description="training size; samples of another "
                                                                            "size are resized; null = as stored")
    shuffle_buffer: int = Field(1000, ge=0, description="samples in the shuffle buffer (0 or 1: no shuffling)")
    num_workers: int = Field(4, ge=0, description="DataLoader workers per process")
    epoch_samples: int | None = Field(None, ge=1, description="nominal epoch (default: marker counts)")
    depth_channels: int = Field(3, ge=1, description="depth repeated to this many channels (reference: 3)")
    drop_caption_prob: float = Field(0.1, ge=0, le=1, description="caption dropout for classifier-free "
                                                                     "guidance (reference: 0.1)")
    drop_depth_prob: float | None = Field(None, ge=0, le=1, description="each depth map; null = stage default "
                                          "(0.1 for local/joint, 0 for global)")
    drop_embedding_prob: float | None = Field(None, ge=0, le=1, description="each CLIP embedding; null = stage "
                                              "default (0.1 for global/joint, 0 for local)")
    use_latents: bool | None = Field(
        None, description="sample the image latents from the shards' latent.npy (build option latents.enabled, at "
                          "data.resolution) instead of encoding every image with the VAE at every step (same "
                          "distribution up to float16 storage); null = auto: from latent.npy for every batch whose "
                          "samples all carry it at the training size, else encoded; true = required; false = never")
    preflight_shards: int = Field(2, ge=0, description="shards validated before training (0 = skip)")
    preflight_strict: bool = Field(False, description="also fail on shard-level problems (truncated tar...)")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="thresholds on the samples' quality "
                                 "scores, applied while streaming (triplets.quality; all off by default)")

    @model_validator(mode="before")
    @classmethod
    def _one_url(cls, data):
        if isinstance(data, dict) and isinstance(data.get("train_shards"), str):
            data = {**data, "train_shards": [data["train_shards"]]}
        return data


class OptimConfig(_Strict):
    """AdamW (reference: lr 1e-5 constant, weight decay 0.01, no warm-up)."""

    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (reference: 1e-5)")
    scale_lr: bool = Field(False, description="lr x accumulation x batch x processes")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, description="AdamW beta1")
    adam_beta2: float = Field(0.999, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, description="AdamW epsilon")
    use_8bit_adam: bool = Field(False, description="bitsandbytes AdamW8bit (pip install bitsandbytes)")
    fused: bool | None = Field(None, description="torch AdamW's fused kernel (one kernel per step instead of one per "
                                                 "tensor group: same update, less memory traffic); null = auto: fused "
                                                 "on CUDA, foreach elsewhere")
    max_grad_norm: float | None = Field(1.0, description="clip over all trainable parameters; null = off "
                                                         "(reference: off)")
    lr_scheduler: str = Field("constant", description="diffusers get_scheduler name")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up steps of the LR schedule")


class TrainLoopConfig(_Strict):
    """Loop, precision, checkpoints, logging."""

    train_batch_size: int = Field(4, ge=1, description="per process (reference: 4 per GPU)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_train_steps: int = Field(100_000, ge=1, description="optimizer steps (derived from num_train_epochs when that "
                                                            "is set)")
    num_train_epochs: float | None = Field(
        None, gt=0, description="run length in epochs of the training shards (data.epoch_samples, default the "
                                "markers' sample counts) instead of steps: max_train_steps = ceil(epochs x batches "
                                "per epoch and process / gradient_accumulation_steps), resolved when training starts "
                                "and recorded in OUTPUT/train_config.yaml (the reference trained 30/30/9 epochs)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "bf16", description="dtype of the frozen VAE / text encoder / UNet and autocast; trainables stay fp32")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute UNet-decoder and local-fuser activations in the backward pass (≈ 18 % more "
                            "FLOPs, less memory); auto = off when a measured step without it fits the GPU's memory "
                            "(cnc_model.training.memory), on otherwise; off on a CPU")
    allow_tf32: bool = Field(True, description="TF32 matmuls on Ampere+ GPUs")
    set_grads_to_none: bool = Field(True, description="zero_grad(set_to_none=True)")
    use_ema: bool = Field(False, description="keep EMA copies of the fusers (ema_<fuser>/ in checkpoints; the "
                                             "final fusers are the EMA weights)")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per optimizer step")
    noise_offset: float = Field(0.0, ge=0, description="0 = reference")
    checkpointing_steps: int = Field(1000, ge=1, description="optimizer steps between checkpoints")
    checkpoints_total_limit: int | None = Field(3, ge=1, description="keep the newest N checkpoints")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint-N folder")
    log_every: int = Field(10, ge=1, description="steps between scalar logs")
    report_to: Literal["tensorboard", "wandb", "mlflow", "none"] = Field(
        "tensorboard", description="accelerate tracker; wandb/mlflow need their extra (pip install 'cnc[wandb]')")
    progress_bar: bool = Field(True, description="progress: a bar on a terminal, log lines in job logs")
    progress_interval_s: float = Field(30.0, gt=0, description="off a terminal: a progress log line at least this "
                                       "often (and every log_every steps)")
    record_keys: bool = Field(False, description="write every consumed sample key to OUTPUT/keys/rank-R.txt")
    cpu: bool = Field(False, description="force CPU even when a GPU is present")
    scratch_dir: str | None = Field(
        None, description="local folder mirroring an object-store output_dir (default: the system temp folder)")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads an unquoted `no` as false


#: ``train.report_to`` → the module its tracker imports and the extra that installs it.
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install 'cnc[wandb]'"),
    "mlflow": ("mlflow", "pip install 'cnc[mlflow]'"),
}


def check_tracker(report_to: str) -> None:
    """Fail in one line when the tracker ``train.report_to`` names is not installed (checked where training runs,
    not where a job is submitted)."""
    if report_to in TRACKER_PACKAGES:
        module, how = TRACKER_PACKAGES[report_to]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to={report_to} needs the {module!r} package, which is not installed: "
                            f"{how}, or set train.report_to=none")


class ValidationConfig(_Strict):
    """Images from CnCPipeline on fixed samples (the first ``num_samples`` of the first shard)."""

    steps: int = Field(1000, ge=0, description="every N optimizer steps (0 = only at the end)")
    num_samples: int = Field(4, ge=0, description="0 = no validation")
    num_inference_steps: Steps = Field(20, description="DDIM steps of the validation images")
    guidance_scale: GuidanceScale = Field(7.5, description="classifier-free guidance of the validation images")
    seed: Seed = 0
    shards: list[str] = Field(default_factory=list, description="default: data.train_shards")


class TrainConfig(_Strict):
    """Everything that defines a training run. Saved as ``OUTPUT/train_config.yaml``."""

    CONFIG_KIND: ClassVar[str] = "train"  # shipped configs named without a folder are looked up in train/

    stage: Literal["local", "global", "joint"] = Field(description="what to train: local fuser, global fuser or "
                                                                  "both (configs/train/{local,global,joint}.yaml)")
    output_dir: str = Field(..., description="checkpoints, logs, validation images, final fusers")
    seed: Seed = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    provenance: dict | None = Field(
        None, description="written by cnc train into OUTPUT/train_config.yaml: identities of the base model and the "
                          "initial fusers, sha256 of the shard manifests; ignored when a config is read")

    @field_validator("provenance", mode="before")
    @classmethod
    def _written_not_read(cls, value):
        return None

    @property
    def trains_local(self) -> bool:
        return self.stage in ("local", "joint")

    @property
    def trains_global(self) -> bool:
        return self.stage in ("global", "joint")

    @property
    def is_tiny(self) -> bool:
        return self.model.pretrained_model_name_or_path == TINY

    @property
    def output_path(self) -> Path:
        """The local folder the run writes: ``output_dir`` itself, or its local mirror for an object-store URL
        (published by :class:`~cnc_model.training.run_storage.RunStorage`)."""
        return self.run_storage().local

    def run_storage(self):
        return RunStorage(self.output_dir, self.train.scratch_dir)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a ``configs/train/*.yaml`` file with ``key.sub=value`` overrides (:func:`cnc.config.load_config`).

    Raises:
        ConfigError: also when an override sets ``train.max_train_steps`` while ``train.num_train_epochs`` decides
            the length (it would be ignored): set ``train.num_train_epochs=null`` with it.
    """

    cfg = load_config(TrainConfig, path, overrides)
    if cfg.train.num_train_epochs is not None and any(o.split("=", 1)[0].strip() == "train.max_train_steps"
                                                      for o in overrides or []):
        raise ConfigError(f"train.num_train_epochs={cfg.train.num_train_epochs:g} sets the run length, so "
                          "train.max_train_steps would be ignored: add --set train.num_train_epochs=null to train by "
                          "steps")
    return cfg
