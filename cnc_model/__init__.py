"""The CnC model on diffusers: local fuser, global fuser, soft guidance, pipeline and trainer."""
