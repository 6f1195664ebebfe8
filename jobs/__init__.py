"""Cluster job submission: Ray Jobs API, Slurm and KubeRay templates.

One run, three launchers: every launcher runs the same command,
``python -m cnc.cli build|train --config <resolved config> ...``, on a Ray cluster.

| module | role |
|---|---|
| ``jobs.run`` | :class:`RunSpec`: kind, resolved config, cluster paths, run id ``cnc-<kind>-<sha12>``, the command |
| ``jobs.submit`` | Ray Jobs API: staging of ``working_dir``, attempt ids (``-rN``), attach/resubmit, log streaming |
| ``jobs.render_slurm`` + ``jobs/slurm/ray_job.sh.tmpl`` | sbatch: Ray head + workers via srun, command on the head |
| ``jobs.render_k8s`` + ``jobs/k8s/rayjob.yaml`` | KubeRay ``RayJob`` + ConfigMap with the resolved config |
| ``jobs.cli`` | ``cnc submit``, ``cnc jobs status|logs|stop|list``, ``cnc render-job`` |

User guide: ``docs/cluster.md``.
"""
