"""The paper's metrics on generated images and the triplets that conditioned them.

All library metrics come from torchmetrics (FID / Inception Score through torch-fidelity's Inception, LPIPS with
AlexNet, SSIM, CLIPScore); the networks come from :mod:`cnc_model.evaluation.models`. Computed here by hand are only
the two CnC-specific measures, which no library has:

- **depth MAE** (:func:`depth_mae`): the depth model's min-max normalised disparity of the generated image against the
  conditioning depth, the fg map inside M and the bg map outside M (per-pixel, pooled over the set); plus
  ``depth_mae_source``: against the disparity of the source image I (the paper's MiDaS-MAE, Table 2);
- **region similarity**: CLIP image-feature cosine of the generated fg region (``gen ⊙ M``) and bg region
  (``gen ⊙ (1 - M)``) to the fg reference (``I ⊙ M``, the object) and to the bg reference (``I_b``, the inpainted
  background). ``region_fg_margin = sim(fg region, fg ref) - sim(fg region, bg ref)`` and ``region_bg_margin`` likewise:
  larger = each region follows its own reference (less concept bleeding, the effect soft guidance aims at).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from cnc_model.evaluation.models import MetricModels, hub_dir

logger = logging.getLogger(__name__)

#: Top-level keys of ``metrics.json`` and whether higher is better (for the table's arrows).
METRICS = {
    "fid": False, "inception_score": True, "clip_score": True, "ssim": True, "lpips": False, "depth_mae": False,
    "depth_mae_fg": False, "depth_mae_bg": False, "depth_mae_source": False,
    "region_fg_to_fg_ref": True, "region_fg_to_bg_ref": False, "region_bg_to_bg_ref": True,
    "region_bg_to_fg_ref": False, "region_fg_margin": True, "region_bg_margin": True,
}
#: Fewest distinct triplets an evaluation needs: FID compares two covariance matrices, each from at least 2 samples.
MIN_SAMPLES = 2


def inception_splits(n: int) -> int:
    """10 splits (the usual protocol) from 1000 images on; a single split for smaller sets (a split of a few images
    has an IS of ~1 whatever the images)."""
    return 10 if n >= 1000 else 1


def depth_mae(pred: np.ndarray, fg_depth: np.ndarray, bg_depth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Mean absolute depth error, fg inside the mask, bg outside, and over the whole image.

    Args:
        pred: ``(N, H, W)`` disparity of the generated images in [0, 1].
        fg_depth, bg_depth: ``(N, H, W)`` conditioning depth maps in [0, 1].
        mask: ``(N, H, W)``, non-zero = foreground.

    Returns:
        ``depth_mae`` (target = fg depth inside M, bg depth outside), ``depth_mae_fg``, ``depth_mae_bg`` (NaN when
        the region is empty everywhere).
    """
    pred, fg, bg = (np.asarray(a, np.float64) for a in (pred, fg_depth, bg_depth))
    inside = np.asarray(mask) > 0
    err_fg, err_bg = np.abs(pred - fg), np.abs(pred - bg)
    total = np.where(inside, err_fg, err_bg)
    return {"depth_mae": float(total.mean()),
            "depth_mae_fg": float(err_fg[inside].mean()) if inside.any() else float("nan"),
            "depth_mae_bg": float(err_bg[~inside].mean()) if (~inside).any() else float("nan")}


class _ProjectedCLIP(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected feature tensors.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` (features in ``pooler_output``), which torchmetrics'
    CLIPScore (1.9) does not unpack; the score itself is still computed by torchmetrics.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _nchw(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


#: torchmetrics would gather its states over every process of a distributed run at ``compute()``; the suite runs on
#: the main process only, with all the images (``cnc eval`` under several processes), so it never syncs.
LOCAL = {"sync_on_compute": False}


class MetricSuite:
    """Builds the metric networks once; :meth:`evaluate` scores one set of generated images (in this process only:
    no torchmetrics state is synced between processes).

    Args:
        models: where the networks come from (checked by the caller with :func:`~cnc_model.evaluation.models.check`).
        device: torch device for all networks.
        batch_size: images per network call.
    """

    def __init__(self, models: MetricModels, device: str = "cpu", batch_size: int = 16) -> None:
        from torchmetrics.image import LearnedPerceptualImagePatchSimilarity, StructuralSimilarityIndexMeasure
        from torchmetrics.image.fid import NoTrainInceptionV3
        from transformers import CLIPModel, CLIPProcessor

        from cnc_model.compose import DPTDepthEstimator

        self.models, self.device, self.batch_size = models, torch.device(device), batch_size
        with hub_dir(models.hub):  # Inception and AlexNet are read from <hub>/checkpoints (no download: checked)
            self.fid_net = NoTrainInceptionV3("inception-v3-compat", [str(models.fid_feature)]).to(self.device)
            self.is_net = NoTrainInceptionV3("inception-v3-compat", ["logits_unbiased"]).to(self.device)
            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, **LOCAL).to(self.device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0, **LOCAL).to(self.device)
        self.clip = CLIPModel.from_pretrained(models.clip).eval().to(self.device)
        self.clip_processor = CLIPProcessor.from_pretrained(models.clip)
        self.depth = DPTDepthEstimator(models.dpt, device=str(self.device))

    # -------------------------------------------------------------------------------------------- components
    def _fid_is(self, real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
        from torchmetrics.image import FrechetInceptionDistance, InceptionScore

        fid = FrechetInceptionDistance(feature=self.fid_net, normalize=False, **LOCAL).to(self.device)
        with warnings.catch_warnings():  # "will save all extracted features in buffer": expected, N is bounded
            warnings.simplefilter("ignore", UserWarning)
            inception = InceptionScore(feature=self.is_net, splits=inception_splits(len(fake)), **LOCAL).to(self.device)
        for sl in _chunks(len(fake), self.batch_size):
            fid.update(_nchw(real[sl]).to(self.device), real=True)
            fid.update(_nchw(fake[sl]).to(self.device), real=False)
            inception.update(_nchw(fake[sl]).to(self.device))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            is_mean, _ = inception.compute()  # (std of one split: "degrees of freedom <= 0")
        return {"fid": float(fid.compute()), "inception_score": float(is_mean)}

    def _pairwise(self, real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
        self.ssim.reset()
        self.lpips.reset()
        for sl in _chunks(len(fake), self.batch_size):
            a = _nchw(fake[sl]).float().div(255).to(self.device)
            b = _nchw(real[sl]).float().div(255).to(self.device)
            self.ssim.update(a, b)
            self.lpips.update(a, b)
        return {"ssim": float(self.ssim.compute()), "lpips": float(self.lpips.compute())}

    def _clip_score(self, fake: np.ndarray, captions: Sequence[str]) -> float:
        from torchmetrics.multimodal.clip_score import CLIPScore

        clip = _ProjectedCLIP(self.clip)
        metric = CLIPScore(model_name_or_path=lambda: (clip, self.clip_processor), **LOCAL).to(self.device)
        for sl in _chunks(len(fake), self.batch_size):
            metric.update(list(_nchw(fake[sl]).to(self.device)), list(captions[sl]))
        return float(metric.compute())

    @torch.no_grad()
    def _image_features(self, images: np.ndarray) -> torch.Tensor:
        """``(N, H, W, 3)`` uint8 -> L2-normalised CLIP image features ``(N, P)``."""
        feats = []
        for sl in _chunks(len(images), self.batch_size):
            pixels = self.clip_processor(images=list(images[sl]), return_tensors="pt").pixel_values
            out = _ProjectedCLIP._tensor(self.clip.get_image_features(pixel_values=pixels.to(self.device)))
            feats.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu())
        return torch.cat(feats)

    def _regions(self, fake: np.ndarray, real: np.ndarray, backgrounds: np.ndarray,
                 masks: np.ndarray) -> dict[str, float]:
        m = (masks > 0)[..., None].astype(np.uint8)
        gen_fg, gen_bg = self._image_features(fake * m), self._image_features(fake * (1 - m))
        ref_fg, ref_bg = self._image_features(real * m), self._image_features(backgrounds)
        sims = {"region_fg_to_fg_ref": (gen_fg * ref_fg).sum(-1), "region_fg_to_bg_ref": (gen_fg * ref_bg).sum(-1),
                "region_bg_to_bg_ref": (gen_bg * ref_bg).sum(-1), "region_bg_to_fg_ref": (gen_bg * ref_fg).sum(-1)}
        out = {k: float(v.mean()) for k, v in sims.items()}
        out["region_fg_margin"] = out["region_fg_to_fg_ref"] - out["region_fg_to_bg_ref"]
        out["region_bg_margin"] = out["region_bg_to_bg_ref"] - out["region_bg_to_fg_ref"]
        return out

    def _depths(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.depth(images[sl]) for sl in _chunks(len(images), self.batch_size)])

    # -------------------------------------------------------------------------------------------- public
    def evaluate(self, generated: np.ndarray, samples: Sequence, captions: Sequence[str] | None = None) -> dict:
        """Score ``generated`` ``(N, H, W, 3)`` uint8 against the N triplets (:class:`triplets.sample.TripletSample`).

        Sources, backgrounds, depths and masks are resized to the generated size when they differ. Returns the keys of
        :data:`METRICS` (floats).
        """
        from PIL import Image

        n, h, w = generated.shape[:3]
        if len(samples) != n:
            raise ValueError(f"{n} generated images for {len(samples)} samples")

        def fit(arr, resample):
            arr = np.asarray(arr)
            if arr.shape[:2] == (h, w):
                return arr
            if arr.dtype != np.uint8:
                return np.asarray(Image.fromarray(arr.astype(np.float32)).resize((w, h), resample))
            return np.asarray(Image.fromarray(arr).resize((w, h), resample))

        real = np.stack([fit(s.image, Image.BICUBIC) for s in samples])
        backgrounds = np.stack([fit(s.background, Image.BICUBIC) for s in samples])
        masks = np.stack([fit(s.mask.astype(np.uint8), Image.NEAREST) for s in samples])
        fg = np.stack([fit(s.fg_depth_float(), Image.BILINEAR) for s in samples])
        bg = np.stack([fit(s.bg_depth_float(), Image.BILINEAR) for s in samples])
        captions = list(captions) if captions is not None else [s.caption for s in samples]

        result = {**self._fid_is(real, generated), "clip_score": self._clip_score(generated, captions),
                  **self._pairwise(real, generated)}
        pred = self._depths(generated)
        result.update(depth_mae(pred, fg, bg, masks))
        result["depth_mae_source"] = float(np.abs(pred - self._depths(real)).mean())
        result.update(self._regions(generated, real, backgrounds, masks))
        return {k: result[k] for k in METRICS}
