"""FLOPs of one triplet, counted model by model at the input sizes each model really runs at.

A triplet's work is a list of model calls (:class:`ModelCost`): which model, on which input (batch 1), how many times
per triplet. :func:`triplet_flops` derives the list from the build config and counts every model once with
``torch.utils.flop_counter`` on a weightless meta copy (:mod:`cnc.flops`); the total is the sum of its parts. The
calls per triplet, for the ``sam`` backend and the default stages:

| stage | model | input (batch 1) | calls |
|---|---|---|---|
| segment | DPT (saliency prior) | the DPT processor's size (384² for DPT-Large) | 1 |
| segment | SAM image encoder | 1024² (its ``img_size``) | 1 |
| segment | SAM prompt encoder + mask decoder | 1 box + 1 point, 3 masks | 1 |
| inpaint | VAE encoder | the masked image, R² | 1 |
| inpaint | UNet | latents (R/8)², 9 channels, 77 text tokens | evaluations × 2 (classifier-free guidance) |
| inpaint | VAE decoder | (R/8)² latents | 1 |
| depth | DPT | I_f, I_b (+ I for the quality scores, unless the prior's pass is reused) at the processor's size | 2-3 |
| embed | CLIP vision | the processor's crop (224²) | 2 |
| quality | CLIP vision (``quality.clip_sim``; the statistics need no model) | two 224² crops | 2 |
| latents | VAE encoder | I at ``latents.resolution`` | 1 (when enabled) |

UNet evaluations = the scheduler's timesteps the pipeline runs (PNDM at 25 steps: 26). The prompt embeddings (CLIP
text, twice per stage, not per triplet) and the non-matmul work (norms, resizes, the scheduler) are not counted.
``tests/triplets/test_flops.py`` checks the list against a counted end-to-end run of the tiny builder.

Sources of the models: :func:`models_of_builder` (the models a :class:`~triplets.builder.TripletBuilder` loaded, so
the suite's MFU uses the models it ran) or :func:`published_models` (the published architectures of
:mod:`cnc.architectures`, for the documented table; no weights needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cnc import architectures as arch
from triplets.config import BuildConfig

#: Text tokens of the prompt embeddings the UNet cross-attends to (CLIP's 77).
TEXT_TOKENS = 77


@dataclass(frozen=True)
class ModelCost:
    """One kind of model call in a triplet's work: FLOPs of one call on one sample, and calls per triplet."""

    stage: str
    model: str
    input: str
    flop_per_call: int
    calls_per_triplet: float

    @property
    def flop_per_triplet(self) -> float:
        return self.flop_per_call * self.calls_per_triplet


@dataclass
class FlopTable:
    """The model calls of one triplet; :attr:`total` is the sum of its rows."""

    rows: list[ModelCost]
    notes: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(r.flop_per_triplet for r in self.rows))

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.rows:
            out[r.stage] = out.get(r.stage, 0.0) + r.flop_per_triplet
        return out

    def as_dict(self) -> dict:
        return {"flop_per_triplet": self.total, "by_stage": self.by_stage(), "notes": self.notes,
                "rows": [{"stage": r.stage, "model": r.model, "input": r.input, "flop_per_call": r.flop_per_call,
                          "calls_per_triplet": r.calls_per_triplet, "flop_per_triplet": r.flop_per_triplet}
                         for r in self.rows]}

    def markdown(self) -> str:
        lines = ["| stage | model | input (batch 1) | GFLOP per call | calls per triplet | TFLOP per triplet |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.stage} | {r.model} | {r.input} | {_gflop(r.flop_per_call)} | "
                         f"{r.calls_per_triplet:g} | {r.flop_per_triplet / 1e12:.3f} |")
        total = f"{self.total / 1e12:.2f}" if self.total >= 1e11 else f"{self.total / 1e12:.3g}"
        lines.append(f"| **total** | | | | | **{total}** |")
        return "\n".join(lines)


def _gflop(flops: float) -> str:
    g = flops / 1e9
    return f"{g:,.1f}" if g >= 10 else f"{g:.3g}"


@dataclass
class BuildModels:
    """Meta copies of the models a build runs (``None`` where the config does not run one) and their input sizes.

    Sizes are ``(H, W)`` of one model input. ``scheduler`` is the inpainting pipeline's scheduler (a copy).
    """

    unet: object
    vae: object
    scheduler: object
    depth_dpt: object
    depth_size: tuple[int, int]
    clip: object
    clip_size: tuple[int, int]
    prior_dpt: object = None
    prior_size: tuple[int, int] | None = None
    sam: object = None
    u2net: object = None
    u2net_size: tuple[int, int] | None = None


def _dpt_size(processor, resolution: int, preprocess: str) -> tuple[int, int]:
    """``(H, W)`` the DPT sees for an R² image: the processor's output, or R² in ``reference`` mode."""
    if preprocess == "reference":
        return resolution, resolution
    import torch

    return _processed_size(processor, torch.zeros(3, resolution, resolution, dtype=torch.uint8))


def _processed_size(processor, image) -> tuple[int, int]:
    shape = processor(images=[image], return_tensors="pt")["pixel_values"].shape
    return int(shape[-2]), int(shape[-1])


def _u2net_size() -> tuple[int, int]:
    from triplets.stages.u2net import U2NET_INPUT_SIZE

    return U2NET_INPUT_SIZE, U2NET_INPUT_SIZE


def models_of_builder(builder) -> BuildModels:
    """:class:`BuildModels` of a loaded :class:`~triplets.builder.TripletBuilder` (its own models, as meta copies)."""
    import torch

    from cnc.flops import meta_copy

    cfg: BuildConfig = builder.cfg
    stages = {s.name: s for s in builder.model_stages}
    pipe = stages["inpaint"].pipe
    depth, embed = stages["depth"].estimator, stages["embed"].embedder
    r = cfg.resolution
    seg = stages["segment"].segmenter
    prior = getattr(seg, "prior_depth", None)
    net = getattr(seg, "net", None)
    return BuildModels(
        unet=meta_copy(pipe.unet), vae=meta_copy(pipe.vae),
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        depth_dpt=meta_copy(depth.model), depth_size=_dpt_size(depth.processor, r, cfg.depth.preprocess),
        clip=meta_copy(embed.model),
        clip_size=_processed_size(embed.processor, torch.zeros(3, r, r, dtype=torch.uint8)),
        prior_dpt=None if prior is None else meta_copy(prior.model),
        prior_size=None if prior is None else _dpt_size(prior.processor, r, "processor"),
        sam=meta_copy(seg.sam.sam) if hasattr(seg, "sam") else None,
        u2net=None if net is None else meta_copy(net), u2net_size=None if net is None else _u2net_size())


def published_models(cfg: BuildConfig) -> BuildModels:
    """:class:`BuildModels` of the published architectures (:mod:`cnc.architectures`) on the meta device: the
    SD-inpainting UNet and VAE, DPT-Large for depth and the saliency prior, CLIP ViT-L/14, SAM ViT-H (``sam``
    backend, attention as ``segment.sam_attention``) or U²-Net (``u2net``)."""
    import torch

    from triplets.stages.sam_batch import use_sdpa_attention
    from triplets.stages.u2net import U2Net

    r = cfg.resolution
    dpt_processor = arch.dpt_large_processor()
    with torch.device("meta"):
        unet, vae, dpt, clip = arch.sd_inpaint_unet(), arch.sd_vae(), arch.dpt_large(), arch.clip_vision()
        sam = arch.sam_vit_h() if cfg.segment.backend == "sam" else None
        u2net = U2Net() if cfg.segment.backend == "u2net" else None
    if sam is not None:
        use_sdpa_attention(sam, cfg.segment.sam_attention)  # as BatchedSam runs it
    return BuildModels(
        unet=unet, vae=vae, scheduler=arch.sd_pndm_scheduler(), depth_dpt=dpt,
        depth_size=_dpt_size(dpt_processor, r, cfg.depth.preprocess), clip=clip,
        clip_size=_processed_size(arch.clip_vision_processor(), torch.zeros(3, r, r, dtype=torch.uint8)),
        prior_dpt=dpt if sam is not None else None,
        prior_size=_dpt_size(dpt_processor, r, "processor") if sam is not None else None,
        sam=sam, u2net=u2net, u2net_size=_u2net_size() if u2net is not None else None)


def unet_evaluations(scheduler, steps: int, strength: float) -> int:
    """UNet evaluations of one inpainting call: the timesteps ``StableDiffusionInpaintPipeline.get_timesteps`` keeps
    (PNDM with ``skip_prk_steps``: ``steps + 1`` at strength 1)."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return len(sched.timesteps[t_start * sched.order:])


# -- counting one call of each model on the meta device --------------------------------------------------------
def _shape(*dims: int) -> str:
    return "×".join(str(d) for d in dims)


def _meta(*shape: int, like=None):
    """A meta tensor of ``shape`` in the floating dtype of ``like``'s parameters (fp32 without ``like``)."""
    import torch

    dtype = next(iter(like.parameters())).dtype if like is not None else torch.float32
    return torch.zeros(*shape, device="meta", dtype=dtype)


def _on_meta(model):
    """``model`` itself when already on meta (the published architectures), else a meta copy."""
    from cnc.flops import meta_copy

    p = next(iter(model.parameters()), None)
    return model if p is not None and p.device.type == "meta" else meta_copy(model)


def unet_call(unet, latent_hw: tuple[int, int]) -> tuple[int, str]:
    import torch

    from cnc.flops import count_flops

    unet = _on_meta(unet)
    c = unet.config
    x, ctx = _meta(1, c.in_channels, *latent_hw, like=unet), _meta(1, TEXT_TOKENS, c.cross_attention_dim, like=unet)
    flops, _ = count_flops(unet, x, torch.tensor(500, device="meta"), encoder_hidden_states=ctx)
    return flops, f"{_shape(1, c.in_channels, *latent_hw)} + {TEXT_TOKENS} tokens"


def vae_encode_call(vae, hw: tuple[int, int]) -> tuple[int, str]:
    from cnc.flops import count_flops

    vae = _on_meta(vae)
    x = _meta(1, vae.config.in_channels, *hw, like=vae)
    return count_flops(vae.encode, x)[0], _shape(1, vae.config.in_channels, *hw)


def vae_decode_call(vae, latent_hw: tuple[int, int]) -> tuple[int, str]:
    from cnc.flops import count_flops

    vae = _on_meta(vae)
    ch = vae.config.latent_channels
    return count_flops(vae.decode, _meta(1, ch, *latent_hw, like=vae))[0], _shape(1, ch, *latent_hw)


def pixel_model_call(model, hw: tuple[int, int]) -> tuple[int, str]:
    """DPT / CLIP vision (``model(pixel_values=...)``) on one ``(1, 3, H, W)`` input."""
    from cnc.flops import count_flops

    model = _on_meta(model)
    return count_flops(lambda x: model(pixel_values=x), _meta(1, 3, *hw, like=model))[0], _shape(1, 3, *hw)


def u2net_call(net, hw: tuple[int, int]) -> tuple[int, str]:
    from cnc.flops import count_flops

    net = _on_meta(net)
    return count_flops(net, _meta(1, 3, *hw, like=net))[0], _shape(1, 3, *hw)


def sam_encoder_call(sam) -> tuple[int, str]:
    from cnc.flops import count_flops

    sam = _on_meta(sam)
    s = sam.image_encoder.img_size
    return count_flops(sam.image_encoder, _meta(1, 3, s, s, like=sam.image_encoder))[0], _shape(1, 3, s, s)


def sam_decoder_call(sam) -> tuple[int, str]:
    """Prompt encoder (1 box + 1 point) + mask decoder (3 masks) of one image.

    The prompt encoder indexes by label values (data-dependent, impossible on meta): it runs on the CPU on an
    uninitialised copy (values do not change FLOPs; it is a few kB); the decoder runs on meta. The dense positional
    encoding (``get_dense_pe``, once per batch, not per image) is not counted.
    """
    import torch

    from cnc.flops import count_flops, meta_copy

    sam = _on_meta(sam)
    pe = meta_copy(sam.prompt_encoder).to_empty(device="cpu").requires_grad_(False)
    c = pe.embed_dim
    coords, labels, box = torch.full((1, 1, 2), 8.0), torch.ones(1, 1, dtype=torch.int), torch.tensor([[0., 0, 9, 9]])
    image_pe = pe.get_dense_pe()

    def run():
        sparse, dense = pe(points=(coords, labels), boxes=box, masks=None)
        sam.mask_decoder(image_embeddings=_meta(1, c, *pe.image_embedding_size, like=sam.mask_decoder),
                         image_pe=image_pe.to("meta"),
                         sparse_prompt_embeddings=sparse.to("meta"), dense_prompt_embeddings=dense.to("meta"),
                         multimask_output=True)

    return count_flops(run)[0], f"1 box + 1 point on {_shape(1, c, *pe.image_embedding_size)}"


# -- the table -------------------------------------------------------------------------------------------------
def triplet_flops(cfg: BuildConfig, models: BuildModels) -> FlopTable:
    """The model calls of one triplet under ``cfg`` with ``models`` (see the module docstring); FLOPs counted."""
    r = cfg.resolution
    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    latent = (r // factor, r // factor)
    memo: dict = {}

    def cost(stage: str, name: str, key: tuple, call, calls: float) -> ModelCost:
        if key not in memo:
            memo[key] = call()
        flops, shape = memo[key]
        return ModelCost(stage, name, shape, flops, float(calls))

    rows: list[ModelCost] = []
    seg = cfg.segment.backend
    prior_key = ("dpt", id(models.prior_dpt), models.prior_size)
    if seg == "sam":
        rows += [cost("segment", "DPT (saliency prior)", prior_key,
                      lambda: pixel_model_call(models.prior_dpt, models.prior_size), 1),
                 cost("segment", "SAM image encoder", ("sam-enc",), lambda: sam_encoder_call(models.sam), 1),
                 cost("segment", "SAM prompt encoder + mask decoder", ("sam-dec",),
                      lambda: sam_decoder_call(models.sam), 1)]
    elif seg == "u2net":
        rows.append(cost("segment", "U²-Net", ("u2net",), lambda: u2net_call(models.u2net, models.u2net_size), 1))
    ip = cfg.inpaint
    evals = unet_evaluations(models.scheduler, ip.num_inference_steps, ip.strength)
    guidance = 2 if ip.guidance_scale > 1 else 1
    rows += [cost("inpaint", "VAE encoder (masked image)", ("vae-enc", r),
                  lambda: vae_encode_call(models.vae, (r, r)), 1),
             cost("inpaint", f"UNet ({evals} evaluations × {guidance} for guidance)", ("unet",),
                  lambda: unet_call(models.unet, latent), evals * guidance),
             cost("inpaint", "VAE decoder", ("vae-dec",), lambda: vae_decode_call(models.vae, latent), 1)]
    depth_key = ("dpt", id(models.depth_dpt), models.depth_size)
    # quality scores need D(I): reused from the sam prior's pass, or a third image in the depth stage's call
    with_image = cfg.image_disparity_mode() == "compute"
    rows.append(cost("depth", "DPT (I_f, I_b" + (", I)" if with_image else ")"), depth_key,
                     lambda: pixel_model_call(models.depth_dpt, models.depth_size), 3 if with_image else 2))
    clip_key = ("clip", models.clip_size)
    rows.append(cost("embed", "CLIP vision (I or I_f, I_b)", clip_key,
                     lambda: pixel_model_call(models.clip, models.clip_size), 2))
    if cfg.quality.enabled and cfg.quality.clip_sim:  # the quality stage's only model work (triplets.quality)
        rows.append(cost("quality", "CLIP vision (two crops)", clip_key,
                         lambda: pixel_model_call(models.clip, models.clip_size), 2))
    if cfg.latents.enabled:
        lr = cfg.latents.resolution or r
        rows.append(cost("latents", "VAE encoder (I)", ("vae-enc", lr),
                         lambda: vae_encode_call(models.vae, (lr, lr)), 1))
    return FlopTable(rows, {"resolution": r, "steps": ip.num_inference_steps, "unet_evaluations": evals,
                            "guidance_batch": guidance, "segment_backend": seg, "quality": cfg.quality.enabled,
                            "latents": cfg.latents.enabled})
