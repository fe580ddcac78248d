"""Wan2.1 DiT models: bidirectional teacher/critic (WanModel) and the causal streaming student (CausalWanModel)."""
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.wan import WanModel, diffusers_config, diffusers_to_wan_state_dict, wan_to_diffusers_state_dict

__all__ = ["CausalWanModel", "WanModel", "diffusers_config", "diffusers_to_wan_state_dict",
           "wan_to_diffusers_state_dict"]
