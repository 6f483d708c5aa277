"""The per-target build strategies: amd64 (a bootable GPT disk image) and jetson
(an L4T flash package). Each has STAGES, context(args) and build(ctx)."""
