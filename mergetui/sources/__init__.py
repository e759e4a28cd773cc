"""Model sources: references, checkpoints opened from headers, LoRA adapters, Hub resolution."""
