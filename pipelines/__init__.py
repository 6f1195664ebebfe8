"""Ray orchestration of the triplet stages: plan, build, commit, resume (``cnc build``).

* :mod:`pipelines.plan` — ``plan.json``: fixed shard specs, config fingerprint, refusal of foreign builds.
* :mod:`pipelines.layout` — output layout and the commit protocol (temp + rename, marker last, recovery).
* :mod:`pipelines.worker` — ``ShardWorker``: one model set, whole shards in, committed shards out.
* :mod:`pipelines.build` — ``run_build`` / ``build_entry``: the driver (Ray session, actor pool, retries, manifest).
* :mod:`pipelines.progress` — live progress bar and summary table.
* :mod:`pipelines.cli` — the ``cnc build`` command.

See ``docs/build.md``.
"""
