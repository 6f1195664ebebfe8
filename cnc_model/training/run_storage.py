"""Where a training run writes: a local ``output_dir`` as is, or an object-store URL through a local mirror.

accelerate, TensorBoard and ``save_pretrained`` write local files. For ``output_dir=s3://...`` (any fsspec URL) the
trainer writes into a local *mirror* folder (``scratch_dir/cnc-train/<hash of the URL>``) and :class:`RunStorage`
publishes it:

* a checkpoint is uploaded file by file with ``trainer_state.json`` **last** — the same completeness rule as on
  disk: a remote ``checkpoint-N/`` counts only when its ``trainer_state.json`` is there;
* rotation deletes the remote checkpoints the local rotation deleted, after the new one is complete;
* ``train_config.yaml``, validation images, final fusers and TensorBoard logs are synced at every checkpoint and at
  the end (logs stage locally and sync);
* ``--resume latest`` looks for the newest complete checkpoint on the store and downloads it into the mirror first.

For a local ``output_dir`` every method is a no-op and the mirror *is* the output folder.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path

from cnc.base.location import Location, resolve

logger = logging.getLogger(__name__)
#: Written last in a checkpoint folder; its presence makes the checkpoint complete.
TRAINER_STATE = "trainer_state.json"


class RunStorage:
    """The output of one training run (see the module docstring).

    Args:
        output_dir: local path or fsspec URL.
        scratch_dir: local folder for the mirror of a remote output (default: the system temp folder).
    """

    def __init__(self, output_dir: str, scratch_dir: str | None = None):
        self.loc: Location = resolve(output_dir)
        if self.loc.is_local:
            self.local = self.loc.local_path()
        else:
            digest = hashlib.sha256(self.loc.url.encode()).hexdigest()[:16]
            self.local = Path(scratch_dir or tempfile.gettempdir()) / "cnc-train" / digest

    @property
    def remote(self) -> bool:
        return not self.loc.is_local

    @property
    def url(self) -> str:
        return self.loc.url

    # -- checkpoints ------------------------------------------------------------------------------------------
    def remote_checkpoints(self) -> list[str]:
        """Names of the complete remote ``checkpoint-N`` folders, oldest first."""
        if not self.remote:
            return []

        found = []
        for name, entry in self.loc.list().items():
            m = re.match(r"^checkpoint-(\d+)$", name)
            if m and entry.get("type") == "directory" and self.loc.child(name, TRAINER_STATE).exists():
                found.append((int(m.group(1)), name))
        return [n for _, n in sorted(found)]

    def pull_checkpoint(self, name: str | None = None) -> Path | None:
        """Download checkpoint ``name`` (default: the newest complete one) into the mirror; its local path."""
        if not self.remote:
            return None
        names = self.remote_checkpoints()
        if name is None:
            if not names:
                return None
            name = names[-1]
        elif name not in names:
            return None
        src, dst = self.loc.child(name), self.local / name
        for path in sorted(src.fs.find(src.path)):
            rel = path[len(src.path.rstrip("/")) + 1:]
            target = dst / rel
            if not target.is_file() or target.stat().st_size != src.fs.size(path):
                target.parent.mkdir(parents=True, exist_ok=True)
                src.fs.get_file(path, str(target))
        logger.info("downloaded checkpoint %s from %s", name, self.url)
        return dst

    def push_checkpoint(self, ckpt: Path) -> None:
        """Upload a complete local checkpoint folder, ``trainer_state.json`` last."""
        if not self.remote:
            return
        files = sorted(p for p in Path(ckpt).rglob("*") if p.is_file())
        state = [p for p in files if p.name == TRAINER_STATE and p.parent == Path(ckpt)]
        for path in [p for p in files if p not in state] + state:
            self.loc.child(ckpt.name, path.relative_to(ckpt).as_posix()).upload(path)
        logger.info("uploaded %s to %s", ckpt.name, self.url)

    def prune_checkpoints(self, total_limit: int | None) -> None:
        """After a checkpoint is complete on the store: delete incomplete remote checkpoints and, with a
        ``total_limit``, all but the newest ``total_limit`` complete ones (the local rotation rule, on the store)."""
        if not self.remote:
            return
        complete = self.remote_checkpoints()
        doomed = complete[:-total_limit] if total_limit else []
        doomed += [n for n, e in self.loc.list().items()
                   if n.startswith("checkpoint-") and e.get("type") == "directory" and n not in complete]
        for name in doomed:
            self.loc.fs.rm(self.loc.child(name).path, recursive=True)
            logger.info("removed remote checkpoint %s", name)

    # -- everything else --------------------------------------------------------------------------------------
    def sync(self, skip_checkpoints: bool = True) -> None:
        """Upload every local file outside ``checkpoint-*`` whose remote copy is missing or has another size."""
        if not self.remote or not self.local.is_dir():
            return
        remote_sizes = {}
        self.loc.fs.invalidate_cache(self.loc.path)
        try:
            for path, info in self.loc.fs.find(self.loc.path, detail=True).items():
                remote_sizes[path[len(self.loc.path.rstrip("/")) + 1:]] = info.get("size")
        except FileNotFoundError:
            pass
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if not path.is_file() or (skip_checkpoints and rel.startswith("checkpoint-")) or path.name.endswith(".tmp"):
                continue
            if remote_sizes.get(rel) != path.stat().st_size:
                self.loc.child(rel).upload(path)
