"""Wan2.1 DiT models: bidirectional teacher/critic (WanModel) and the causal streaming student (CausalWanModel)."""
from reward_forcing.models.wan import WanModel, diffusers_config, diffusers_to_wan_state_dict, wan_to_diffusers_state_dict

__all__ = ["WanModel", "diffusers_config", "diffusers_to_wan_state_dict", "wan_to_diffusers_state_dict"]
