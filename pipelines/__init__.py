"""Ray orchestration of the triplet stages: plan, build, commit, resume (``cnc build``).

* :mod:`pipelines.plan` — ``plan.json``: fixed shard specs, config fingerprint, refusal of foreign builds.
* :mod:`pipelines.worker` — ``ShardWorker``: one model set, whole shards in, committed shards out.
* :mod:`pipelines.sink` — ``ShardSink``: one shard's streaming tar, committed through ``triplets.shardio``.
* :mod:`pipelines.scheduler` — ``ShardScheduler``: actor pool, placement, assignment, retries, teardown.
* :mod:`cnc.ray_session` / :mod:`cnc.reaper` — the one Ray session (loopback-only locally, no orphans).
* :mod:`pipelines.build` — ``run_build`` / ``build_entry``: plan, lock, recover, schedule, manifest.
* :mod:`pipelines.progress` — live progress bar and summary table.
* :mod:`pipelines.cli` — the ``cnc build`` command.

See ``docs/build.md``.
"""
