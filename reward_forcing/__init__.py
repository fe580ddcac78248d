"""Reward Forcing: streaming causal text-to-video generation (EMA-Sink KV cache, Re-DMD distillation)."""


def __getattr__(name):
    # `from reward_forcing import VideoPipeline` without importing torch and the models for every CLI.
    if name == "VideoPipeline":
        from reward_forcing.inference.pipeline import VideoPipeline

        return VideoPipeline
    if name == "export_to_video":
        from reward_forcing.video import export_to_video

        return export_to_video
    raise AttributeError(f"module 'reward_forcing' has no attribute {name!r}")
