"""Reward Forcing: streaming causal text-to-video generation (EMA-Sink KV cache, Re-DMD distillation)."""
