"""The work plan (standard S1): fixed shard specs, written before any model runs.

``plan.json`` maps shard ids to their source items and is a pure function of the input
(its absolute path and the sorted items :func:`triplets.readers.read_items` returns) and of
the build config. The shard of an item never changes, so after any sequence of crashes and
reruns an item can only ever be committed in its own shard.

The *fingerprint* is the hash of every config key that changes what the shards contain and of the
content identity of every model (:mod:`cnc.identity`: hub commit or weight-file hash). Purely
operational keys (:data:`OPERATIONAL_KEYS`: Ray layout, device, failure policy, input format
detection) are left out, so a build may resume on another cluster. A rerun whose config, models or
items differ is refused (:class:`PlanMismatchError`): use a new output folder. Changed model weights
may be accepted on purpose (``allow_model_change``, ``cnc build --allow-model-change``): the plan then
keeps its fingerprint, records the change under ``model_changes`` and the new identities under ``models``.
"""

from __future__ import annotations

import hashlib
import json
import logging

from cnc.base.errors import UserError
from cnc.base.location import TEMP_NAME, resolve
from cnc.config import config_dict
from cnc.identity import identity_changes
from triplets.config import BuildConfig
from triplets.shardio import BuildOutput
from triplets.shardio.names import LOCK_FILE, PLAN_FILE, PROBE_PREFIX

log = logging.getLogger(__name__)

PLAN_VERSION = 1
#: Top-level config keys that do not change shard contents (left out of the fingerprint).
#: ``batch_size`` stays in: batched convolutions round differently, so it changes tar bytes.
OPERATIONAL_KEYS: tuple[str, ...] = ("ray", "device", "max_failure_fraction", "input_format", "storage")


class PlanMismatchError(UserError, ValueError):
    """The output folder holds a build of another input or config."""


def content_config(cfg: BuildConfig) -> dict:
    """The config keys that define shard contents (everything except :data:`OPERATIONAL_KEYS`)."""
    return {k: v for k, v in config_dict(cfg).items() if k not in OPERATIONAL_KEYS}


def fingerprint(cfg: BuildConfig, models: dict | None = None) -> str:
    """16-hex sha256 of :func:`content_config` and of the model identities (``{key: {"identity": ...}}``)."""
    content = content_config(cfg)
    if models:
        content["model_identities"] = {k: (v or {}).get("identity") for k, v in models.items()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(items: list[dict], cfg: BuildConfig, input_path: str, input_format: str,
              models: dict | None = None) -> dict:
    """Split sorted ``items`` into shards of ``cfg.samples_per_shard`` (pure function).

    Returns:
        ``{"version", "fingerprint", "config", "models", "input", "input_format", "num_items",
        "samples_per_shard", "items_sha256", "shards": [{"shard", "name", "items"}]}``;
        ``models`` maps config keys to :func:`cnc.identity.model_identity` records.
    """
    n = cfg.samples_per_shard
    shards = [{"shard": i // n, "name": f"{i // n:06d}", "items": items[i:i + n]} for i in range(0, len(items), n)]
    return {
        "version": PLAN_VERSION,
        "fingerprint": fingerprint(cfg, models),
        "config": content_config(cfg),
        "models": models or {},
        "input": input_path,
        "input_format": input_format,
        "num_items": len(items),
        "samples_per_shard": n,
        "items_sha256": hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest(),
        "shards": shards,
    }


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
    strangers = [n for n in output.loc.list()
                 if n != LOCK_FILE and not n.startswith(PROBE_PREFIX) and not TEMP_NAME.match(n)]
    if strangers:
        raise PlanMismatchError(f"output folder {output.url} is not empty and holds no {PLAN_FILE} "
                                f"(found {', '.join(sorted(strangers)[:3])}); use an empty or new folder")
    path.write_json(plan, indent=None)
    log.info("wrote %s: %d items in %d shards of %d", path.url, plan["num_items"], len(plan["shards"]),
             plan["samples_per_shard"])
    return plan


def absolute_input(path: str) -> str:
    """Canonical form of the input (absolute local path or URL), so plans do not depend on the working directory.
    ``pipe:`` commands and brace patterns are kept as given."""
    if path.startswith("pipe:"):
        return path
    return resolve(path).url
