"""Serving: the inference engine behind `helox serve` (continuous batching, LoRA per request)."""
