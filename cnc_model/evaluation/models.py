"""The metric networks of ``cnc eval``: where they come from, fail-fast checks, seeded tiny stand-ins.

Four networks, all loaded like every other model of the project (local path or cache, never a silent download):

* Inception-v3 (torch-fidelity's FID port) — FID, Inception Score — torch hub cache
  ``checkpoints/weights-inception-2015-12-05-6726825d.pth``; with ``--metrics-models DIR``: ``DIR/hub/checkpoints/``
* AlexNet (torchvision) + LPIPS heads (shipped with torchmetrics) — LPIPS — torch hub cache
  ``checkpoints/alexnet-owt-7be5be79.pth``; ``DIR/hub/checkpoints/``
* CLIP ViT-L/14 (``CLIPModel`` + ``CLIPProcessor``) — CLIPScore, region similarity — ``openai/clip-vit-large-patch14``
  (HF cache); ``DIR/clip/``
* DPT-Large (``DPTForDepthEstimation``) — depth MAE — ``Intel/dpt-large`` (HF cache); ``DIR/dpt/``

torchmetrics / torch-fidelity / torchvision fetch Inception and AlexNet with ``torch.hub.load_state_dict_from_url``,
which reads ``<hub dir>/checkpoints/<file>`` when present (``weights_only`` loading) and downloads otherwise; the
metrics are therefore built inside :func:`hub_dir` pointing at the chosen hub folder, after :func:`check` made sure the
files are there.

``--metrics-models tiny`` materialises **seeded random networks of the same classes** once, as real checkpoint files
in that layout (under ``$CNC_CACHE_DIR`` or ``~/.cache/cnc``): the whole command then runs offline through the same
code path; the numbers mean nothing, but every metric is computed exactly as with the real weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cnc.base.errors import ModelUnavailableError
from cnc.hub import resolve_pretrained

logger = logging.getLogger(__name__)

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
OPTION = "--metrics-models"
TINY = "tiny"
_TINY_VERSION = 1


def _alexnet_url() -> str:
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.DEFAULT.url


@dataclass(frozen=True)
class MetricModels:
    """Where each metric network is loaded from.

    Attributes:
        hub: a torch hub folder whose ``checkpoints/`` holds the Inception and AlexNet files.
        clip: CLIP folder or hub id (``CLIPModel`` + ``CLIPProcessor``).
        dpt: DPT folder or hub id (``DPTForDepthEstimation`` + its image processor).
        fid_feature: Inception feature width for FID (2048 as in the literature; 64 with tiny networks).
        tiny: Inception and AlexNet are the seeded random stand-ins.
        tiny_clip, tiny_dpt: CLIP / DPT are the seeded tiny stand-ins.
    """

    hub: Path
    clip: str
    dpt: str
    fid_feature: int = 2048
    tiny: bool = False
    tiny_clip: bool = False
    tiny_dpt: bool = False

    def kind(self) -> str:
        """``tiny`` (all stand-ins), ``real`` (none) or ``mixed`` (``metrics.json``'s ``metric_models``)."""
        flags = {self.tiny, self.tiny_clip, self.tiny_dpt}
        return "mixed" if len(flags) > 1 else ("tiny" if self.tiny else "real")

    def describe(self) -> dict[str, str]:
        """Which network each metric used: ``tiny`` or where it was loaded from (``metrics.json``)."""
        return {"inception_alexnet": TINY if self.tiny else str(self.hub),
                "clip": TINY if self.tiny_clip else self.clip, "dpt": TINY if self.tiny_dpt else self.dpt}


def cache_dir() -> Path:
    """``$CNC_CACHE_DIR`` or ``~/.cache/cnc``."""
    return Path(os.environ.get("CNC_CACHE_DIR") or Path.home() / ".cache" / "cnc").expanduser()


def resolve(spec: str | None, clip: str | None = None, dpt: str | None = None) -> MetricModels:
    """``None`` -> the default caches; ``tiny`` -> seeded tiny networks; a folder -> ``DIR/hub``, ``DIR/clip``,
    ``DIR/dpt``.

    ``clip`` / ``dpt`` override the CLIP and DPT sources; ``tiny`` there selects the same seeded tiny network of that
    class as ``--metrics-models tiny`` does (the other networks keep their source).
    """
    tiny_root = materialise_tiny() if TINY in (spec, clip, dpt) else None
    tiny_clip, tiny_dpt = clip == TINY or (spec == TINY and clip is None), dpt == TINY or (spec == TINY and dpt is None)
    if spec == TINY:
        hub, default_clip, default_dpt = tiny_root / "hub", str(tiny_root / "clip"), str(tiny_root / "dpt")
    elif spec is None:
        hub, default_clip, default_dpt = Path(torch.hub.get_dir()), "openai/clip-vit-large-patch14", "Intel/dpt-large"
    else:
        root = Path(spec).expanduser().resolve()  # absolute: a missing folder is reported, never looked up on the hub
        hub, default_clip, default_dpt = root / "hub", str(root / "clip"), str(root / "dpt")
    return MetricModels(
        hub=hub, clip=str(tiny_root / "clip") if tiny_clip else clip or default_clip,
        dpt=str(tiny_root / "dpt") if tiny_dpt else dpt or default_dpt, fid_feature=64 if spec == TINY else 2048,
        tiny=spec == TINY, tiny_clip=tiny_clip, tiny_dpt=tiny_dpt)


def check(models: MetricModels) -> list[str]:
    """One line per missing network, naming what to download, where to, and the option (empty = all present)."""
    problems = []
    for what, url in (("Inception-v3 weights (FID, Inception Score)", INCEPTION_URL),
                      ("AlexNet weights (LPIPS)", _alexnet_url())):
        target = models.hub / "checkpoints" / Path(url).name
        if not target.is_file():
            problems.append(f"{what} not found at {target}: download {url} there, or pass {OPTION} DIR with "
                            f"DIR/hub/checkpoints/{Path(url).name} ({OPTION} tiny: random stand-ins)")
        elif not _plain_state_dict(target):
            problems.append(f"{what} at {target} is not a plain tensor state dict (refused: torch.hub would unpickle "
                            f"it with weights_only=False); replace it with the file from {url}")
    for what, spec, sub, own in (("CLIP model (CLIPScore, region similarity)", models.clip, "clip", "--clip-model"),
                                 ("depth model (depth MAE)", models.dpt, "dpt", "--depth-model")):
        try:
            resolve_pretrained(spec, OPTION)
        except ModelUnavailableError:
            problems.append(f"{what} '{spec}' not found (not a folder, not in the Hugging Face cache): download it "
                            f"and pass {own} PATH, or {OPTION} DIR with it in DIR/{sub}/ ({OPTION} tiny: random "
                            f"stand-ins)")
    return problems


def _plain_state_dict(path: Path) -> bool:
    """Whether ``path`` loads with ``weights_only=True``.

    torch.hub (used inside torch-fidelity and torchvision) unpickles cached files with ``weights_only=False``; every
    file is therefore checked here first, so only plain tensor state dicts ever reach it.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure means "not a plain state dict"
        return False
    return True


@contextlib.contextmanager
def hub_dir(path: Path):
    """Temporarily point ``torch.hub`` at ``path`` (where torchmetrics / torchvision look for cached weights)."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


# ------------------------------------------------------------------------------------------------ tiny stand-ins
def _random_inception_state(seed: int) -> dict:
    """A seeded random state dict of torch-fidelity's ``FeatureExtractorInceptionV3`` (the FID Inception).

    Its constructor always loads a state dict; a subclass keeps the seeded initialisation when handed an empty one.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _SeededInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - keep the random init
            if state_dict:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        torch.manual_seed(seed)
        net = _SeededInit("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    return {k: v.clone() for k, v in net.state_dict().items()}


def _tiny_clip(seed: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from cnc import tiny

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny.tiny_tokenizer())
    return CLIPModel(config).eval(), processor


def materialise_tiny(seed: int = 0, cache: str | Path | None = None) -> Path:
    """Write the seeded tiny metric networks once (atomically) under ``cache`` (default :func:`cache_dir`)."""
    root = Path(cache or cache_dir()) / f"metrics-tiny-v{_TINY_VERSION}-seed{seed}"
    if (root / "complete.json").is_file():
        return root
    import torchvision

    from cnc import tiny

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        ckpts = tmp / "hub" / "checkpoints"
        ckpts.mkdir(parents=True)
        torch.save(_random_inception_state(seed), ckpts / Path(INCEPTION_URL).name)
        torch.manual_seed(seed)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpts / Path(_alexnet_url()).name)
        model, processor = _tiny_clip(seed)
        model.save_pretrained(tmp / "clip")
        processor.save_pretrained(tmp / "clip")
        dpt, dpt_processor = tiny.tiny_dpt(seed)
        dpt.save_pretrained(tmp / "dpt")
        dpt_processor.save_pretrained(tmp / "dpt")
        (tmp / "complete.json").write_text(json.dumps({"seed": seed, "version": _TINY_VERSION}))
        try:
            tmp.rename(root)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("tiny metric networks written to %s", root)
    return root
