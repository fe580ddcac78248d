"""Reading a released VideoReward checkpoint: step folder, model_config.json, state dict, rubric template.

model.pth is the full PEFT-wrapped state dict saved by transformers <= 4.51: old key layout,
LoRA A/B beside `base_layer` weights. It is remapped to the current layout and the LoRA is folded into the
base weights, so neither peft nor the old transformers is needed.
"""
import ast
import hashlib
import json
import re
from pathlib import Path

import torch

from reward_forcing.errors import CheckpointError

TEMPLATE_NAME = "DETAILED_PROMPT_WITH_SPECIAL_TOKEN"
TEMPLATE_FILE = "prompt_template.py"
# sha256 of KwaiVGI/VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN with the `{text_prompt}` placeholder in place.
TEMPLATE_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
PROMPT_PLACEHOLDER = "{text_prompt}"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")

PEFT_PREFIX = "base_model.model."
# transformers >= 4.52 moved the decoder under `model.language_model` and the vision tower under `model.visual`.
OLD_TO_NEW_PREFIXES = (
    ("base_model.model.model.", "base_model.model.model.language_model."),
    ("base_model.model.visual.", "base_model.model.model.visual."),
)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.(?P<adapter>[^.]+)\.weight$")


def find_step_dir(root, step=None) -> Path:
    """`root/checkpoint-<step>`: the given step, else the highest."""
    root = Path(root)
    if step is not None:
        path = root / f"checkpoint-{step}"
        if not (path / "model.pth").is_file():
            raise CheckpointError(f"no {path / 'model.pth'}")
        return path
    steps = [int(p.name.split("-", 1)[1]) for p in root.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    if not steps:
        raise CheckpointError(f"no checkpoint-<step> folder in {root}")
    return root / f"checkpoint-{max(steps)}"


def resolve_root(checkpoint_dir) -> Path:
    """Accept the VideoReward folder itself or its parent (upstream spells it VideoReward or Videoreward)."""
    path = Path(checkpoint_dir)
    for candidate in (path, path / "VideoReward", path / "Videoreward"):
        if (candidate / "model_config.json").is_file():
            return candidate
    raise CheckpointError(f"no model_config.json in {path} (nor in its VideoReward/ or Videoreward/ subfolder)")


def load_model_config(root: Path) -> dict:
    try:
        config = json.loads((root / "model_config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {root / 'model_config.json'}: {err}") from None
    for section in ("data_config", "model_config", "peft_lora_config"):
        if section not in config:
            raise CheckpointError(f"{root / 'model_config.json'} has no '{section}' section")
    return config


def load_state_dict(step_dir: Path) -> dict:
    path = step_dir / "model.pth"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, ...
        raise CheckpointError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def remap_old_layout(state: dict) -> dict:
    """Apply the two transformers <= 4.51 -> >= 4.52 prefix rules; keys already in the new layout are kept."""
    out = {}
    for key, value in state.items():
        if not key.startswith("base_model.model.model.language_model.") and not key.startswith(
            "base_model.model.model.visual."
        ):
            for old, new in OLD_TO_NEW_PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        out[key] = value
    return out


def lora_scale(peft_config: dict) -> float:
    r, alpha = peft_config["lora_r"], peft_config["lora_alpha"]
    return alpha / r**0.5 if peft_config.get("use_rslora") else alpha / r


def merge_lora(state: dict, scale: float) -> dict:
    """W <- W_base + scale·(B @ A) for every LoRA-wrapped Linear; `base_layer.` is dropped from the names."""
    pairs = {}
    for key in state:
        match = _LORA_KEY.match(key)
        if match:
            pairs.setdefault(match["module"], {})[match["part"]] = key
    out = {k: v for k, v in state.items() if not _LORA_KEY.match(k)}
    for module, parts in pairs.items():
        base_key = f"{module}.base_layer.weight"
        if set(parts) != {"A", "B"} or base_key not in out:
            raise CheckpointError(f"incomplete LoRA weights for {module} (need lora_A, lora_B and base_layer.weight)")
        base = out[base_key]
        delta = state[parts["B"]].float() @ state[parts["A"]].float()
        if delta.shape != base.shape:
            raise CheckpointError(f"LoRA for {module} has shape {tuple(delta.shape)}, base weight {tuple(base.shape)}")
        out[base_key] = (base.float() + scale * delta).to(base.dtype)
    return {k.replace(".base_layer.", "."): v for k, v in out.items()}


def strip_peft_prefix(state: dict) -> dict:
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}


def read_template(path, expected_sha256=TEMPLATE_SHA256) -> str:
    """The rubric constant from VideoAlign's prompt_template.py, read with ast (never executed), hash-checked."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read prompt template {path}: {err}") from None
    text = None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == TEMPLATE_NAME for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            text = node.value.value
    if text is None:
        raise CheckpointError(f"{path} has no string constant {TEMPLATE_NAME}")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(
            f"{TEMPLATE_NAME} in {path} has sha256 {digest[:12]}..., expected {expected_sha256[:12]}... "
            "(not VideoAlign's rubric; fetch it with download_checkpoints.sh)"
        )
    return text


def check_template(text: str) -> str:
    """The rubric must hold the prompt placeholder once and each reward token once, in order VQ, MQ, TA."""
    if text.count(PROMPT_PLACEHOLDER) != 1:
        raise CheckpointError(f"prompt template must contain {PROMPT_PLACEHOLDER} exactly once")
    positions = []
    for token in REWARD_TOKENS:
        if text.count(token) != 1:
            raise CheckpointError(f"prompt template must contain {token} exactly once")
        positions.append(text.index(token))
    if positions != sorted(positions):
        raise CheckpointError(f"prompt template must hold the reward tokens in the order {', '.join(REWARD_TOKENS)}")
    return text


def fill_template(template: str, prompt: str) -> str:
    # Literal replacement: prompts may contain braces, which str.format would choke on.
    return template.replace(PROMPT_PLACEHOLDER, prompt)
