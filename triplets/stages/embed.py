"""``embed``: CLIP image embeddings (``CLIPVisionModelWithProjection.image_embeds``, not L2-normalised).

e_f comes from the full image I by default (reference behaviour; ``fg_source="foreground"``
uses I_f = I⊙M), e_b from I_b. The HF processor (torchvision backend) resizes and
normalises the uint8 batch on the model's device (the reference fed uint8 CUDA tensors).
"""

from __future__ import annotations

import numpy as np

from triplets.stages.base import Stage, resolve_device, resolve_dtype


class CLIPImageEmbedder:
    """``(N, H, W, 3)`` uint8 RGB → ``(N, D)`` float32 ``image_embeds`` (D = 768 for ViT-L/14)."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", device: str = "auto", dtype: str = "auto"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.processor = CLIPImageProcessor.from_pretrained(model)
        self.model = CLIPVisionModelWithProjection.from_pretrained(model)
        self.model.to(self.device, self.dtype).eval()
        self.dim = int(self.model.config.projection_dim)

    def __call__(self, images) -> np.ndarray:
        """``images``: ``(N, H, W, 3)`` uint8, a NumPy array or a tensor (on the device already)."""
        import torch

        with torch.inference_mode():
            batch = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
            batch = batch.to(self.device).permute(0, 3, 1, 2)  # uint8
            inputs = self.processor(images=list(batch), return_tensors="pt", device=self.device)
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype)).image_embeds
        return out.float().cpu().numpy().astype(np.float32)


class EmbedStage(Stage):
    """Adds ``fg_emb`` and ``bg_emb`` ``(N, D)`` float32. Needs ``image``, ``mask``, ``background``."""

    name = "embed"

    def __init__(self, model: str = "openai/clip-vit-large-patch14", fg_source: str = "image", device: str = "auto",
                 dtype: str = "auto"):
        if fg_source not in ("image", "foreground"):
            raise ValueError(f"embed fg_source must be 'image' or 'foreground', got {fg_source!r}")
        self.embedder = CLIPImageEmbedder(model, device, dtype)
        self.fg_source = fg_source

    def process(self, rows: dict) -> tuple[dict, dict[int, str]]:
        import torch

        dev = self.embedder.device
        with torch.inference_mode():  # I_f and the concatenation formed on the device, not copied on the host
            image, bg = (torch.from_numpy(np.ascontiguousarray(rows[k])).to(dev) for k in ("image", "background"))
            if self.fg_source == "foreground":
                image = image * torch.from_numpy(np.ascontiguousarray(rows["mask"])).to(dev)[..., None]
            emb = self.embedder(torch.cat([image, bg]))
        n = len(rows["image"])
        return {"fg_emb": emb[:n], "bg_emb": emb[n:]}, {}

    def empty(self, batch: dict) -> dict:
        n = len(batch["key"])
        return {"fg_emb": np.zeros((n, self.embedder.dim), np.float32),
                "bg_emb": np.zeros((n, self.embedder.dim), np.float32)}
