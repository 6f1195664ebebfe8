"""Training-step throughput and peak memory of ``cnc train``: the project's settings vs a reference-style setting.

    .venv/bin/python benchmarks/train_throughput.py                       # tiny models on CPU (+ real size on GPU)
    .venv/bin/python benchmarks/train_throughput.py --size real --steps 5 --batch 4 --resolution 512   # GPU
    .venv/bin/python benchmarks/train_throughput.py --size real --steps 1 --allow-real-on-cpu   # slow, ~15 GB RAM

One training step = what :meth:`cnc_model.training.trainer.Trainer.compute_loss` does (VAE encode, CLIP text,
global fuser, local fuser, frozen UNet with the encoder under no_grad, ε-MSE) + backward + AdamW step, on synthetic
batches (random images, depths, masks, embeddings; data loading excluded). Settings:

* ``project``: the shipped defaults: frozen VAE / text encoder / UNet in bf16 (fp16 on GPUs without bf16), fuser
  weights fp32 under autocast, SDPA (fused kernels), gradient checkpointing ``auto`` (decided by the trainer's own
  measured probe, :mod:`cnc_model.training.memory`; the row says which), AdamW fused on CUDA (``optim.fused``);
* ``project-latents``: ``project`` with latents in the batch (drawn from stored VAE moments, as from shards built with
  ``latents.enabled``, which ``data.use_latents: null`` uses by default; no VAE encode per step);
* ``project-checkpointing`` / ``project-no-checkpointing``: ``project`` with ``train.gradient_checkpointing`` forced
  on / off (~18 % more FLOPs per step for less activation memory);
* ``project-foreach``: ``project`` with ``optim.fused: false`` (AdamW's multi-tensor foreach kernels);
* ``project-fp32``: the same in fp32 (what CPUs run fastest);
* ``reference``: fp32 everywhere and attention through the unfused "math" kernel (materialised Q·K logits, as the
  reference's einsum + softmax), gradient checkpointing on (``use_checkpoint: True``), AdamW not fused.

FLOPs per image (``flop_per_image``) are counted with ``torch.utils.flop_counter`` on one step of the same setting
on the meta device (forward, recomputation and backward; not the optimizer) and give the row's TFLOP/s.

``--size real`` builds the SD 1.5 architecture (UNet, VAE, CLIP ViT-L/14 text tower from their published configs,
random weights, no download) + ``LocalFuser.from_unet`` + ``GlobalFuser(768, 768, 4)``; ``--size tiny`` the test
models. Every (size, setting) runs in its own process so peak memory is its own: ``torch.cuda.max_memory_allocated``
on GPUs, the process's peak RSS on CPUs. Results are printed as a Markdown table (and JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("project", "project-latents", "project-checkpointing", "project-no-checkpointing", "project-foreach",
            "project-fp32", "reference")
MIXED = ("project", "project-latents", "project-checkpointing", "project-no-checkpointing", "project-foreach")


def real_components(seed: int = 0) -> dict:
    """SD 1.5 architecture with random weights (:mod:`cnc.architectures`) + the two CnC fusers, all fp32."""
    import torch

    from cnc import architectures as arch
    from cnc.tiny import tiny_tokenizer
    from cnc_model.models.global_fuser import GlobalFuser
    from cnc_model.models.local_fuser import LocalFuser

    torch.manual_seed(seed)
    unet = arch.sd_unet()
    return dict(vae=arch.sd_vae(), text_encoder=arch.clip_text(), tokenizer=tiny_tokenizer(), unet=unet,
                noise_scheduler=_training_scheduler(), local_fuser=LocalFuser.from_unet(unet),
                global_fuser=GlobalFuser(768, 768, 4))


def _training_scheduler():
    """SD 1.x training noise schedule (its scheduler/scheduler_config.json, as DDPM)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def tiny_components(seed: int = 0) -> dict:
    from cnc import tiny
    from cnc_model.testing.tiny import tiny_global_fuser, tiny_local_fuser

    unet = tiny.tiny_unet(seed=seed)
    return dict(vae=tiny.tiny_vae(seed), text_encoder=tiny.tiny_text_encoder(seed), tokenizer=tiny.tiny_tokenizer(),
                unet=unet, noise_scheduler=_training_scheduler(), local_fuser=tiny_local_fuser(unet, seed).train(),
                global_fuser=tiny_global_fuser(seed).train())


def synthetic_batch(batch: int, resolution: int, embed_dim: int, tokenizer) -> dict:
    import torch

    from cnc_model.data import tokenize

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 1, resolution, resolution)
    mask[:, :, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    return {"pixel_values": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
            "fg_depth": torch.rand(batch, 3, resolution, resolution, generator=g),
            "bg_depth": torch.rand(batch, 3, resolution, resolution, generator=g), "mask": mask,
            "fg_emb": torch.randn(batch, embed_dim, generator=g), "bg_emb": torch.randn(batch, embed_dim, generator=g),
            "input_ids": tokenize(tokenizer, ["a photo of a cat on a sofa"] * batch)}


def _setup(size: str, setting: str, stage: str, device):
    """Components, trainer (only ``compute_loss`` and ``_make_optimizer`` are used), trainable parameters, weight
    dtype, for ``setting`` on ``device`` (``meta``: weightless, for counting FLOPs)."""
    import torch

    from cnc_model.attention import install_soft_guidance
    from cnc_model.training.components import Components
    from cnc_model.training.config import TrainConfig
    from cnc_model.training.trainer import Trainer

    cuda = device.type == "cuda"
    wdt = torch.float32
    if setting in MIXED:
        wdt = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    with device:  # random initialisation on the GPU: seconds instead of a minute for the real size
        comps = Components(**(real_components() if size == "real" else tiny_components()))
    if stage == "local":
        comps.global_fuser = None
    elif stage == "global":
        comps.local_fuser = None
    for frozen in (comps.vae, comps.text_encoder, comps.unet):
        frozen.requires_grad_(False).eval().to(device=device, dtype=wdt)
    trainables = comps.trainables()
    for m in trainables.values():
        m.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    n_tokens = comps.global_fuser.config.tokens_per_reference if comps.global_fuser is not None else 0
    install_soft_guidance(comps.unet, comps.local_fuser, num_text_tokens=77, tokens_per_reference=n_tokens)
    checkpointing = {"project-checkpointing": True, "project-no-checkpointing": False, "reference": True}.get(
        setting, "auto")
    cfg = TrainConfig(stage=stage, output_dir="/tmp/unused", data={"use_latents": None},
                      optim={"fused": False if setting in ("project-foreach", "reference") else None},
                      train={"gradient_checkpointing": checkpointing})
    trainer = Trainer(cfg, comps)
    trainer.accelerator = SimpleNamespace(device=device, num_processes=1)
    trainer.weight_dtype, trainer.models = wdt, trainables
    params = [p for m in trainables.values() for p in m.parameters()]
    return comps, trainer, params, wdt


def _data(comps, size: str, setting: str, batch: int, resolution: int, device) -> dict:
    import torch

    embed_dim = comps.global_fuser.config.image_embed_dim if comps.global_fuser is not None else 32
    data = synthetic_batch(batch, resolution, embed_dim if size == "tiny" else 768, comps.tokenizer)
    if setting == "project-latents":  # what shards built with latents.enabled hold: (B, 2, C, R/8, R/8) float16
        factor = 2 ** (len(comps.vae.config.block_out_channels) - 1)
        data["latent_dist"] = torch.randn(batch, 2, comps.vae.config.latent_channels, resolution // factor,
                                          resolution // factor).half()
    if device.type == "meta":
        data = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    return data


def flop_per_image(size: str, setting: str, stage: str, batch: int, resolution: int, checkpointing: bool) -> float:
    """FLOPs of one training step per image (forward, recomputation, backward; counted on the meta device)."""
    import torch

    from cnc.flops import FlopCounting
    from cnc_model.training.trainer import enable_checkpointing

    device = torch.device("meta")
    comps, trainer, params, wdt = _setup(size, setting, stage, device)
    if checkpointing:
        enable_checkpointing(comps)
    data = _data(comps, size, setting, batch, resolution, device)
    with FlopCounting() as c:
        trainer.compute_loss(data).backward()
    return c.total / batch


def run_one(size: str, setting: str, stage: str, batch: int, resolution: int, steps: int, warmup: int) -> dict:
    """One measurement in this process (called through a subprocess by :func:`main`)."""
    import torch

    from cnc_model.training.memory import checkpointing_decision
    from cnc_model.training.trainer import enable_checkpointing

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    mixed = setting in MIXED
    t0 = time.perf_counter()
    comps, trainer, params, wdt = _setup(size, setting, stage, device)
    build_s = time.perf_counter() - t0
    optimizer = trainer._make_optimizer(params)
    data = _data(comps, size, setting, batch, resolution, device)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = sdpa_kernel(SDPBackend.MATH) if setting == "reference" else None

    def loss() -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype=wdt) if mixed else torch.autocast(device.type, enabled=False)
        with autocast:
            return trainer.compute_loss(data)

    def step() -> None:  # no host sync inside (the trainer keeps losses on the device too)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if kernel is not None:
        kernel.__enter__()
    try:
        ckpt = trainer.cfg.train.gradient_checkpointing
        if ckpt == "auto":  # the trainer's decision: a measured step without checkpointing
            def probe() -> None:
                loss().backward()
                optimizer.zero_grad(set_to_none=True)

            decision = checkpointing_decision(device, probe, params)
            ckpt, reason = decision.enabled, decision.reason
        else:
            reason = "forced by the setting"
        if ckpt:
            enable_checkpointing(comps)
        timed(warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(steps)
    finally:
        if kernel is not None:
            kernel.__exit__(None, None, None)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for m in (comps.vae, comps.text_encoder, comps.unet) for p in m.parameters())
    flops = flop_per_image(size, setting, stage, batch, resolution, bool(ckpt))
    images_per_s = batch * steps / seconds
    return {"size": size, "setting": setting, "stage": stage, "device": torch.cuda.get_device_name() if cuda else
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "batch": batch, "resolution": resolution, "steps": steps, "step_s": seconds / steps,
            "images_per_s": images_per_s, "peak_gb": peak / 2**30, "peak_kind": "cuda allocated" if cuda
            else "process RSS", "trainable_params_m": n_train / 1e6, "frozen_params_m": n_frozen / 1e6,
            "dtype": str(wdt).replace("torch.", ""), "build_s": build_s, "gradient_checkpointing": bool(ckpt),
            "checkpointing_reason": reason, "fused_adamw": bool(optimizer.defaults.get("fused")),
            "flop_per_image": flops, "tflops": flops * images_per_s / 1e12}


def table(rows: list[dict]) -> str:
    head = ("| size | setting | stage | device | batch × res | checkpointing / fused AdamW | s/step | images/s | "
            "TFLOP/s | peak memory | vs reference |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ref = next((x for x in rows if x["size"] == r["size"] and x["setting"] == "reference"), None)
        speed = f"{r['images_per_s'] / ref['images_per_s']:.2f}× speed, {r['peak_gb'] / ref['peak_gb']:.2f}× mem" \
            if ref and ref is not r else "1×"
        ckpt = f"{'on' if r['gradient_checkpointing'] else 'off'} / {'yes' if r['fused_adamw'] else 'no'}"
        lines.append(f"| {r['size']} | {r['setting']} ({r['dtype']}) | {r['stage']} | {r['device']} | "
                     f"{r['batch']} × {r['resolution']} | {ckpt} | {r['step_s']:.3f} | {r['images_per_s']:.2f} | "
                     f"{r['tflops']:.3g} | {r['peak_gb']:.2f} GB ({r['peak_kind']}) | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "real", "both"), default="both")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--stage", choices=("local", "global", "joint"), default="joint")
    p.add_argument("--batch", type=int, default=None, help="default: 4 (real), 4 (tiny)")
    p.add_argument("--resolution", type=int, default=None, help="default: 512 (real), 64 (tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 real, 20 tiny)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--allow-real-on-cpu", action="store_true", help="run the real-size model without a GPU")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--_one", nargs=2, metavar=("SIZE", "SETTING"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._one:
        size, setting = args._one
        print("RESULT " + json.dumps(run_one(size, setting, args.stage, args.batch, args.resolution, args.steps,
                                             args.warmup)))
        return
    import torch

    sizes = ["tiny", "real"] if args.size == "both" else [args.size]
    rows = []
    for size in sizes:
        if size == "real" and not torch.cuda.is_available() and not args.allow_real_on_cpu:
            print("real size skipped: no GPU (a real-size SD 1.5 + CnC step needs ~15 GB RAM and minutes per step on "
                  "a CPU; pass --allow-real-on-cpu --steps 1 to measure it anyway)", file=sys.stderr)
            continue
        batch = args.batch or 4
        res = args.resolution or (512 if size == "real" else 64)
        steps = args.steps or (5 if size == "real" else 20)
        for setting in args.settings:
            cmd = [sys.executable, __file__, "--_one", size, setting, "--stage", args.stage, "--batch", str(batch),
                   "--resolution", str(res), "--steps", str(steps), "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{size}/{setting} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            print(f"{size}/{setting}: {rows[-1]['images_per_s']:.2f} images/s, {rows[-1]['peak_gb']:.2f} GB",
                  file=sys.stderr)
            if args.json:  # after every setting: a run stopped by a time limit keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
