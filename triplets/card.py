"""The dataset card of a build folder: ``_cnc/README.md`` (for people) and ``.huggingface.yaml`` (for readers).

``datasets.load_dataset(folder)`` reads ``.huggingface.yaml`` (the same metadata a Hub ``README.md`` front matter
holds: ``configs``/``data_files`` naming the tars, and the ``features``), so the folder loads without arguments. The
card itself is not written as ``OUT/README.md`` because Ray Data's ``read_webdataset(folder)`` would read every
non-hidden top-level file as a tar; copy ``_cnc/README.md`` to the top when publishing the folder on the Hub.

:func:`write_card` is called by the build together with ``manifest.json`` and by ``cnc inspect --card``.
"""

from __future__ import annotations

import json
import logging

import yaml

from triplets.sample import SAMPLE_FIELDS
from triplets.shardio import BuildOutput, read_manifest
from triplets.shardio.names import CARD_FILE, HF_YAML_FILE, MANIFEST_FILE, TAR_SUFFIX

log = logging.getLogger(__name__)

#: Column → (Hugging Face feature dtype, meaning); the columns ``datasets``' webdataset builder yields: the two it adds
#: and every member of :data:`triplets.sample.SAMPLE_FIELDS`.
FIELDS: dict[str, tuple[str, str]] = {
    "__key__": ("string", "sample key, dot-free, derived from the source path (stable across runs)"),
    "__url__": ("string", "the shard the sample came from"),
    **{f.suffix: (f.feature, f"{f.content}; {f.stored}") for f in SAMPLE_FIELDS},
}


def hf_metadata() -> dict:
    """The metadata ``datasets`` reads: one ``default`` config whose ``train`` split is every top-level tar."""
    return {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"*{TAR_SUFFIX}"}]}]}


def _front_matter(manifest: dict) -> dict:
    return {
        "license": "unknown",  # for the dataset owner: the licence of the source images and captions
        "pretty_name": f"CnC triplets: {manifest.get('name') or 'build'}",
        "task_categories": ["text-to-image"],
        "tags": ["webdataset", "compose-and-conquer", "depth", "cnc"],
        **hf_metadata(),
    }


def render_card(manifest: dict) -> str:
    """The Markdown card (YAML front matter + sections) of a build described by its ``manifest.json``."""
    totals = manifest.get("totals") or {}
    cfg = manifest.get("config") or {}
    lines = ["---", yaml.safe_dump(_front_matter(manifest), sort_keys=False).rstrip(), "---", "",
             f"# {manifest.get('name') or 'CnC triplet shards'}", "",
             "Compose-and-Conquer training triplets (ICLR 2024) in WebDataset shards, built by `cnc build` "
             f"(cnc {(manifest.get('versions') or {}).get('cnc')}).", "",
             "## Counts", "",
             f"- samples: {totals.get('samples')} in {totals.get('shards_committed')} shard(s) "
             f"({totals.get('shards_planned')} planned, uncommitted: {totals.get('shards_uncommitted') or 'none'})",
             f"- input items: {totals.get('items')}; failed: {totals.get('failures')} "
             f"(by stage: {json.dumps(totals.get('failures_by_stage') or {})})",
             f"- bytes: {totals.get('bytes')}",
             f"- input: `{manifest.get('input')}` ({manifest.get('input_format')})", "",
             "## Fields", "", "| column | feature | content |", "|---|---|---|"]
    lines += [f"| `{k}` | {dtype} | {text} |" for k, (dtype, text) in FIELDS.items()]
    lines += ["", "## How it was built", "", "| model (config key) | id | revision | identity |", "|---|---|---|---|"]
    for key, rec in sorted((manifest.get("models") or {}).items()):
        rec = rec if isinstance(rec, dict) else {"id": rec}
        lines.append(f"| `{key}` | {rec.get('id')} | {rec.get('revision')} | {rec.get('identity')} |")
    lines += ["", f"Plan fingerprint: `{manifest.get('fingerprint')}`. Settings (`_cnc/config.yaml`):", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=True).rstrip(), "```", "",
              "Package versions: " + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()), "",
              "## Loading", "",
              "Stock decoders (`webdataset`'s `.decode(\"rgb8\")`, `\"l\"`, `\"torchrgb\"`...) turn the 16-bit depth "
              "maps into 8 bits (near-constant 255); use `triplets.wds.decoder()` (or any 16-bit PNG decoder):", "",
              "```python",
              "import webdataset as wds, triplets.wds",
              "ds = wds.WebDataset(\"FOLDER/{000000..000009}.tar\").decode(triplets.wds.decoder())",
              "ray.data.read_webdataset(\"FOLDER\")            # Ray Data",
              "datasets.load_dataset(\"FOLDER\", split=\"train\")  # Hugging Face datasets (.huggingface.yaml)",
              "```", "", "See docs/formats.md of the cnc project.", "",
              "## Licence", "",
              "Set by the dataset owner: the licence of the source images and captions applies (`license:` above), "
              "as do the licences of the models listed.", "",
              "## Citation", "",
              "Compose and Conquer: Diffusion-Based 3D Depth Aware Composable Image Synthesis (Lee et al., ICLR 2024).",
              ""]
    return "\n".join(lines)


def write_card(output: BuildOutput | str, manifest: dict | None = None) -> list[str]:
    """Write (or refresh) the card and the ``datasets`` metadata of a build folder; return the URLs written.

    Args:
        output: the build folder (local or URL).
        manifest: its ``manifest.json`` (read from the folder when omitted; raises ``FileNotFoundError`` when none).
    """
    out = output if isinstance(output, BuildOutput) else BuildOutput(output)
    if manifest is None:
        try:
            _, manifest = read_manifest(out.file(MANIFEST_FILE))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc} (not a build folder, or a build older than cards)") from None
    card = out.file(CARD_FILE).write_text(render_card(manifest))
    hf = out.file(HF_YAML_FILE).write_text(yaml.safe_dump(hf_metadata(), sort_keys=False))
    log.info("wrote the dataset card %s and %s", card.url, hf.url)
    return [card.url, hf.url]


__all__ = ["FIELDS", "hf_metadata", "render_card", "write_card"]
