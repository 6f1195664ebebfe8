"""The work plan: fixed shard specs, written before any model runs.

``plan.json`` maps shard ids to their source items and is a pure function of the input and of the build config.
The shard of an item never changes, so after any sequence of crashes and reruns an item can only ever be committed
in its own shard. Two forms; which one an input gets is its reader's choice (:func:`triplets.readers.plan_input`),
this module knows no input format:

* **version 1, item lists** (folder, COCO, Pick-a-Pic inputs; :func:`make_plan`): every shard spec lists
  its items (``{"shard", "name", "items": [...]}``); the input is identified by its absolute path and the sha256 of
  the sorted items :func:`triplets.readers.read_items` returns. Size grows with the item count: fine to ~1M images.
* **version 2, row ranges** (table and WebDataset inputs; :func:`make_table_plan`): ``inputs`` lists each table
  file or tar once
  (``{"url", "size", "etag"|"mtime", ["sha256"], "rows"}``) and a shard spec is
  ``{"shard", "name", "nitems", "ranges": [{"file": INDEX, "url", "start", "stop"}]}`` (rows ``[start, stop)`` of
  input file ``INDEX``, or samples ``[start, stop)`` of a tar in member order; a shard may span the end of one file
  and the start of the next). Size is O(input files + shards); tables are planned from metadata (parquet footers),
  tars from their headers (read in parallel, items not kept). Workers read their rows lazily
  (:func:`triplets.readers.shard_items`). An output holding a version-1 plan of a WebDataset input (earlier builds)
  keeps a version-1 plan and resumes.

Both are resumable; a rerun on a changed input (items, or any table file's size/etag/mtime/hash) is refused.

The *fingerprint* is the hash of every config key that changes what the shards contain and of the
content identity of every model (:mod:`cnc.identity`: hub commit or weight-file hash). Purely
operational keys (:data:`OPERATIONAL_KEYS`: Ray layout, device, failure policy, input format
detection) are left out, so a build may resume on another cluster. A rerun whose config, models or
items differ is refused (:class:`PlanMismatchError`): use a new output folder. Changed model weights
may be accepted on purpose (``allow_model_change``, ``cnc build --allow-model-change``): the plan then
keeps its fingerprint, records the change under ``model_changes`` and the new identities under ``models``.
"""

from __future__ import annotations

import logging

from cnc.base.errors import UserError
from cnc.base.hashing import json_sha256
from cnc.base.location import TEMP_NAME, resolve
from cnc.config import config_dict, config_hash
from cnc.identity import identity_changes
from triplets.config import BuildConfig
from triplets.readers import ReadOptions, same_file
from triplets.readers import plan_input as plan_reader_input
from triplets.shardio import BuildOutput
from triplets.shardio.names import LOCK_FILE, PLAN_FILE, PROBE_PREFIX, shard_name

log = logging.getLogger(__name__)

PLAN_VERSION = 1
#: Version of row-range plans (table inputs).
TABLE_PLAN_VERSION = 2
#: Top-level config keys that do not change shard contents (left out of the fingerprint).
#: ``batch_size`` stays in: batched convolutions round differently, so it changes tar bytes. ``allow_outside_input``
#: only changes which items are read, which the plan's ``items_sha256`` already compares.
#: ``fetch`` (timeouts, retries, opt-outs) only changes which web images fail, never a sample's bytes.
OPERATIONAL_KEYS: tuple[str, ...] = ("ray", "device", "max_failure_fraction", "input_format", "storage",
                                     "allow_outside_input", "input_hash", "compile", "fetch", "channels_last")


class PlanMismatchError(UserError, ValueError):
    """The output folder holds a build of another input or config."""


def content_config(cfg: BuildConfig, input_format: str | None = None) -> dict:
    """The config keys that define shard contents (everything except :data:`OPERATIONAL_KEYS`).

    ``table`` (column names) only counts for table inputs, so plans of other inputs keep their fingerprint.
    """
    skip = OPERATIONAL_KEYS if input_format == "table" else (*OPERATIONAL_KEYS, "table")
    content = {k: v for k, v in config_dict(cfg).items() if k not in skip}
    if cfg.quality.enabled:  # the scores' definitions change tar content as much as their settings do
        from triplets.quality import QUALITY_VERSION

        content["quality"] = dict(content["quality"], version=QUALITY_VERSION)
    return content


def fingerprint(cfg: BuildConfig, models: dict | None = None, input_format: str | None = None) -> str:
    """16-hex sha256 of :func:`content_config` and of the model identities (``{key: {"identity": ...}}``)."""
    content = content_config(cfg, input_format)
    if models:
        content["model_identities"] = {k: (v or {}).get("identity") for k, v in models.items()}
    return config_hash(content)


def make_plan(items: list[dict], cfg: BuildConfig, input_path: str, input_format: str,
              models: dict | None = None) -> dict:
    """Split sorted ``items`` into shards of ``cfg.samples_per_shard`` (pure function).

    Returns:
        ``{"version", "fingerprint", "config", "models", "input", "input_format", "num_items",
        "samples_per_shard", "items_sha256", "shards": [{"shard", "name", "items"}]}``;
        ``models`` maps config keys to :func:`cnc.identity.model_identity` records.
    """
    n = cfg.samples_per_shard
    shards = [{"shard": i // n, "name": shard_name(i // n), "items": items[i:i + n]} for i in range(0, len(items), n)]
    return {
        **_plan_header(PLAN_VERSION, cfg, models, input_path, input_format, len(items)),
        "items_sha256": json_sha256(items),
        "shards": shards,
    }


def make_table_plan(files: list[dict], cfg: BuildConfig, input_path: str, models: dict | None = None,
                    input_format: str = "table") -> dict:
    """Split the rows of table ``files`` (in order) into shards of ``cfg.samples_per_shard`` row ranges.

    Args:
        files: ``[{"url", "size", "etag"|"mtime", ["sha256"], "rows"}]`` in input order
            (:func:`triplets.readers.plan_input`); for ``input_format="webdataset"`` the tars, "rows" being
            their samples (image members) in member order.

    Returns:
        the version-2 plan (module docstring); O(files + shards) in time and size, a pure function of its arguments.
    """
    n = cfg.samples_per_shard
    shards: list[dict] = []
    cur: list[dict] = []
    filled = 0
    for index, f in enumerate(files):
        pos = 0
        while pos < f["rows"]:
            take = min(n - filled, f["rows"] - pos)
            cur.append({"file": index, "url": f["url"], "start": pos, "stop": pos + take})
            pos, filled = pos + take, filled + take
            if filled == n:
                shards.append({"shard": len(shards), "name": shard_name(len(shards)), "nitems": n, "ranges": cur})
                cur, filled = [], 0
    if cur:
        shards.append({"shard": len(shards), "name": shard_name(len(shards)), "nitems": filled, "ranges": cur})
    inputs = [dict(f) for f in files]
    return {
        **_plan_header(TABLE_PLAN_VERSION, cfg, models, input_path, input_format, sum(f["rows"] for f in files)),
        "inputs": inputs,
        "inputs_sha256": json_sha256(inputs),
        "shards": shards,
    }


def _plan_header(version: int, cfg: BuildConfig, models: dict | None, input_path: str, input_format: str,
                 num_items: int) -> dict:
    """The keys every plan version shares (what the input and config were, and the fingerprint over them)."""
    return {"version": version, "fingerprint": fingerprint(cfg, models, input_format),
            "config": content_config(cfg, input_format), "models": models or {}, "input": input_path,
            "input_format": input_format, "num_items": num_items, "samples_per_shard": cfg.samples_per_shard}


def plan_input(cfg: BuildConfig, src: str, fmt: str, models: dict | None = None, version: int | None = None) -> dict:
    """The plan of input ``src`` read as ``fmt``: what the format's reader plans (:func:`triplets.readers.plan_input`:
    row ranges for tables and WebDataset tars, item lists otherwise) split into shards.

    Args:
        version: ``1`` plans as item lists where the format allows both (what builds of earlier versions wrote for
            WebDataset inputs: they resume).

    Raises:
        triplets.readers.InputError: the input cannot be read as ``fmt``.
    """
    planned = plan_reader_input(src, fmt, ReadOptions.from_config(cfg), item_lists=version == PLAN_VERSION)
    if planned.items is not None:
        return make_plan(planned.items, cfg, src, fmt, models)
    return make_table_plan(planned.files, cfg, src, models, fmt)


def plan_summary(plan: dict) -> dict:
    """``{"items", "shards", "input_files", "version", "input", "input_format", "fingerprint"}`` of a plan."""
    files = len(plan["inputs"]) if "inputs" in plan else len({it["source"].split("#", 1)[0]
                                                              for s in plan["shards"] for it in s["items"]})
    return {"items": plan["num_items"], "shards": len(plan["shards"]), "input_files": files,
            "version": plan["version"], "input": plan["input"], "input_format": plan["input_format"],
            "fingerprint": plan["fingerprint"]}


def shard_size(spec: dict) -> int:
    """Planned items of a shard spec (either plan form)."""
    return int(spec["nitems"]) if "nitems" in spec else len(spec["items"])


def _input_changes(old: list[dict], new: list[dict]) -> list[str]:
    out = []
    old_by, new_by = {f["url"]: f for f in old}, {f["url"]: f for f in new}
    out += [f"{u} removed" for u in old_by if u not in new_by]
    out += [f"{u} added" for u in new_by if u not in old_by]
    for u, f in new_by.items():
        o = old_by.get(u)
        if o is not None and (not same_file(o, f) or o.get("rows") != f.get("rows")):
            what = [k for k in ("size", "rows", "etag", "mtime", "sha256")
                    if k in o and k in f and o.get(k) != f.get(k)]
            out.append(f"{u} changed ({', '.join(what) or 'identity'})")
    return out


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_compatible(old: dict, new: dict, output: str, allow_model_change: bool = False) -> list[str]:
    """Raise :class:`PlanMismatchError` unless ``old`` (on disk) and ``new`` describe the same build.

    Returns:
        the accepted model changes (``"KEY: OLD -> NEW"``; only with ``allow_model_change``).
    """
    where = f"output folder {output} already holds a build of"
    if old.get("version") != new["version"]:
        raise PlanMismatchError(f"{where} plan version {old.get('version')} (this is {new['version']}); "
                                f"use a new --output folder")
    if old.get("config") != new["config"]:
        changes = _diff(old.get("config", {}), new["config"]) or ["(unknown)"]
        raise PlanMismatchError(f"{where} a different config ({'; '.join(changes[:5])}"
                                f"{'; ...' if len(changes) > 5 else ''}); use a new --output folder "
                                f"or the original config")
    changes = identity_changes(old.get("models") or {}, new.get("models") or {})
    if changes and not allow_model_change:
        raise PlanMismatchError(f"{where} other model weights ({'; '.join(changes)}); use the same weights, a new "
                                f"--output folder, or --allow-model-change to continue on purpose")
    if old.get("input") != new["input"]:
        raise PlanMismatchError(f"{where} another input ({old.get('input')!r}, now {new['input']!r}); "
                                f"use a new --output folder")
    if new["version"] == TABLE_PLAN_VERSION:
        moved = _input_changes(old.get("inputs") or [], new["inputs"])
        if moved or old.get("shards") != new["shards"]:
            raise PlanMismatchError(f"{where} input {new['input']!r} as it was: {'; '.join(moved[:3]) or 'rows moved'}"
                                    f"{'; ...' if len(moved) > 3 else ''}; use a new --output folder")
        return changes
    if old.get("items_sha256") != new["items_sha256"] or old.get("shards") != new["shards"]:
        raise PlanMismatchError(f"{where} input {new['input']!r} as it was: it had {old.get('num_items')} items, "
                                f"now {new['num_items']} (files added, removed or changed); use a new --output folder")
    return changes


def prepare_plan(output: BuildOutput, plan: dict, allow_model_change: bool = False) -> dict:
    """Write ``plan.json`` into a fresh output, or check it against the one already there.

    With ``allow_model_change`` a resume may load other model weights: the plan on disk keeps its fingerprint,
    its ``models`` become the new identities and ``model_changes`` records old and new of every changed key.

    Raises:
        PlanMismatchError: different input/config, or a non-empty folder that is not a build.
    """
    path = output.file(PLAN_FILE)
    if path.exists():
        try:
            old = path.read_json()
        except ValueError:
            raise PlanMismatchError(f"{path.url} is not valid JSON; use a new --output folder") from None
        changes = check_compatible(old, plan, output.url, allow_model_change)
        if changes:
            log.warning("continuing with changed model weights (--allow-model-change): %s", "; ".join(changes))
            old.setdefault("model_changes", []).append({"before": old.get("models"), "after": plan["models"]})
            old["models"] = plan["models"]
            path.write_json(old, indent=None)
        log.info("plan matches %s: resuming (%d shards)", path.url, len(plan["shards"]))
        return old
    output.loc.makedirs()
    refuse_foreign_folder(output)
    path.write_json(plan, indent=None)
    log.info("wrote %s: %d items in %d shards of %d", path.url, plan["num_items"], len(plan["shards"]),
             plan["samples_per_shard"])
    return plan


def refuse_foreign_folder(output: BuildOutput) -> None:
    """Raise :class:`PlanMismatchError` when ``output`` exists, holds files and no ``plan.json`` (not a build).

    Called before the output is locked too, so a refused folder is left exactly as it was (no ``.lock``).
    """
    if output.file(PLAN_FILE).exists() or not output.loc.exists():
        return
    strangers = [n for n in output.loc.list()
                 if n != LOCK_FILE and not n.startswith(PROBE_PREFIX) and not TEMP_NAME.match(n)]
    if strangers:
        raise PlanMismatchError(f"output folder {output.url} is not empty and holds no {PLAN_FILE} "
                                f"(found {', '.join(sorted(strangers)[:3])}); use an empty or new folder")


def absolute_input(path: str) -> str:
    """Canonical form of the input (absolute local path or URL), so plans do not depend on the working directory.
    ``pipe:`` commands and brace patterns are kept as given."""
    if path.startswith("pipe:"):
        return path
    return resolve(path).url
