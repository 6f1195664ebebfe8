"""Cluster job submission: Ray Jobs API, Slurm and KubeRay templates."""
