"""Ray orchestration of the triplet stages: plan, build, commit, resume."""
