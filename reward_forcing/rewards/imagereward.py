"""ImageReward (Xu et al., arXiv 2304.05977) on transformers' BLIP modules, differentiable in the pixels.

The reward of arXiv 2601.16933 ("Reward-Forcing: Autoregressive Video Generation with Reward Feedback"), which
fine-tunes the student on the ImageReward score of a generated frame. Released files (Hugging Face
`THUDM/ImageReward`), read from one folder:
    ImageReward.pt       flat state dict: `blip.visual_encoder.*` (timm-style ViT), `blip.text_encoder.*` (BLIP's
                         BERT with image cross-attention in every layer, THUDM/ImageReward models/BLIP/med.py),
                         `mlp.layers.{0,2,4,6,7}.*` (linear head on the first text token, no nonlinearities)
    med_config.json      the text encoder's BERT config
    bert-base-uncased/   the tokenizer (ImageReward adds `[DEC]` as BOS and `[ENC]` as an extra special token)
The ViT's shape comes from the checkpoint tensors (its head width is 64, as in both of BLIP's ViTs,
THUDM/ImageReward models/BLIP/blip.py `create_vit`); the text encoder's from med_config.json.

CLI: python -m reward_forcing.rewards.imagereward --checkpoint_dir checkpoints/ImageReward IMAGE_OR_VIDEO "prompt"
         [--frame last|N]
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reward_forcing.checkpoints import _load_torch, state_dict_mismatch
from reward_forcing.errors import CheckpointError, run_cli
from reward_forcing.rewards.qwen_video import INPUT_RANGES, VideoInputError

CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_DIR = "bert-base-uncased"
FOLDER = "ImageReward"  # its folder under a checkpoint_dir (download_checkpoints.sh --with-imagereward)

# THUDM/ImageReward ImageReward.py: score standardisation, prompt length, CLIP normalisation.
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# THUDM/ImageReward models/BLIP: ViT head width and LayerNorm eps (vit.py), tokens added to bert-base-uncased (blip.py).
VIT_HEAD_DIM = 64
VIT_LAYER_NORM_EPS = 1e-6
ADDED_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}

VISION = "blip.visual_encoder."
TEXT = "blip.text_encoder."
HEAD = "mlp.layers."
# Released keys no score depends on: BLIP's contrastive projections and the text position-id buffer.
UNUSED = re.compile(r"^blip\.(?!visual_encoder\.|text_encoder\.)|^blip\.text_encoder\.embeddings\.position_ids$")
_VIT_RENAMES = (
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\."), "embeddings.patch_embedding."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"encoder.layers.\1.layer_norm1."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"encoder.layers.\1.layer_norm2."),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\."), r"encoder.layers.\1.self_attn.qkv."),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\."), r"encoder.layers.\1.self_attn.projection."),
    (re.compile(r"^blocks\.(\d+)\.mlp\."), r"encoder.layers.\1.mlp."),
    (re.compile(r"^norm\."), "post_layernorm."),
)


# ---- checkpoint layout ----
def _vit_key(name: str) -> str:
    for pattern, replacement in _VIT_RENAMES:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    raise CheckpointError(f"unknown ViT key '{VISION}{name}' in the ImageReward checkpoint")


def released_to_transformers(state: dict) -> dict:
    """Released ImageReward keys -> this module's (`vision.*` BlipVisionModel, `text.*` BlipTextModel, `head.*`)."""
    out = {}
    for key, value in state.items():
        if UNUSED.search(key):
            continue
        if key.startswith(VISION):
            out["vision." + _vit_key(key[len(VISION):])] = value
        elif key.startswith(TEXT):
            out["text." + key[len(TEXT):]] = value  # BlipTextModel keeps BLIP's med.py names
        elif key.startswith(HEAD):
            out["head." + key[len(HEAD):]] = value
        else:
            raise CheckpointError(f"unexpected key '{key}' in the ImageReward checkpoint")
    return out


def vision_config(state: dict):
    """BlipVisionConfig of the released ViT, from its tensor shapes."""
    from transformers import BlipVisionConfig

    try:
        width = state[VISION + "cls_token"].shape[-1]
        patch = state[VISION + "patch_embed.proj.weight"].shape[-1]
        positions = state[VISION + "pos_embed"].shape[1]
        intermediate = state[VISION + "blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"the ImageReward checkpoint has no {err.args[0]}") from None
    depth = len({k.split(".")[3] for k in state if k.startswith(VISION + "blocks.")})
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % VIT_HEAD_DIM:
        raise CheckpointError(f"ViT of width {width} with {positions} positions is not a square-grid BLIP ViT")
    return BlipVisionConfig(hidden_size=width, intermediate_size=intermediate, num_hidden_layers=depth,
                            num_attention_heads=width // VIT_HEAD_DIM, image_size=grid * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=VIT_LAYER_NORM_EPS, attention_dropout=0.0)


def text_config(med: dict, encoder_width: int):
    """BlipTextConfig from med_config.json; BLIP sets the cross-attention width to the ViT's (blip_pretrain.py)."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise CheckpointError("med_config.json must set add_cross_attention: true (ImageReward's text encoder "
                              "cross-attends to the image)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"position_embedding_type '{med['position_embedding_type']}' is not supported")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    missing = [k for k in keys if k not in med]
    if missing:
        raise CheckpointError(f"med_config.json lacks {', '.join(missing)}")
    return BlipTextConfig(**{k: med[k] for k in keys}, encoder_hidden_size=encoder_width, is_decoder=True,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def build_head(state: dict) -> nn.Sequential:
    """The released MLP: linears at the checkpoint's `mlp.layers.N` indices, identities at its dropout slots."""
    indices = sorted({int(k[len(HEAD):].split(".")[0]) for k in state if k.startswith(HEAD)})
    if not indices:
        raise CheckpointError(f"the ImageReward checkpoint has no {HEAD}* head")
    layers = [nn.Identity() for _ in range(indices[-1] + 1)]
    for i in indices:
        out_features, in_features = state[f"{HEAD}{i}.weight"].shape
        layers[i] = nn.Linear(in_features, out_features)
    return nn.Sequential(*layers)


def resolve_folder(checkpoint_dir) -> Path:
    """The folder holding ImageReward.pt: `checkpoint_dir` itself or its `ImageReward/` subfolder."""
    path = Path(checkpoint_dir)
    for candidate in (path, path / FOLDER):
        if (candidate / CHECKPOINT_FILE).is_file():
            return candidate
    raise CheckpointError(f"no {CHECKPOINT_FILE} in {path} (nor in {path / FOLDER})")


def _read_med_config(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{MED_CONFIG_FILE} not found: {path}")
    try:
        med = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(med, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return med


def load_tokenizer(folder: Path):
    """bert-base-uncased with ImageReward's added `[DEC]` (BOS) and `[ENC]` tokens (ids vocab and vocab + 1)."""
    from transformers import BertTokenizer

    if not folder.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {folder}")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many types for a broken folder
        raise CheckpointError(f"cannot load a BERT tokenizer from {folder}: {str(err).splitlines()[0]}") from None
    for name, value in ADDED_TOKENS.items():
        tokenizer.add_special_tokens({name: value})
    return tokenizer


# ---- preprocessing (ImageReward.py `_transform`: Resize(n, bicubic), CenterCrop(n), Normalize) ----
def resize_short_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> short side `size`, long side int(size·long/short) (torchvision Resize(int)); antialiased
    bicubic, which follows PIL's bicubic filter (the released transform runs PIL)."""
    h, w = images.shape[-2:]
    new_hw = short_side_size(h, w, size)
    if new_hw == (h, w):
        return images
    return F.interpolate(images, size=new_hw, mode="bicubic", antialias=True, align_corners=False)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision CenterCrop: offsets round((side - size) / 2)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise VideoInputError(f"cannot centre-crop {size}x{size} from a {h}x{w} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top:top + size, left:left + size]


def preprocess(images: torch.Tensor, size: int, input_range: str = "[-1,1]") -> torch.Tensor:
    """[N, 3, H, W] pixels -> normalised [N, 3, size, size]. Clamped to [0, 1] before resizing, as THUDM/ImageReward
    ReFL.py does for generated images, and after, as the released PIL transform stores uint8 (bicubic overshoots
    at hard edges). Differentiable in `images` (zero gradient where clamped)."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise VideoInputError(f"images must be a [N, 3, H, W] tensor, got {shape}")
    if input_range not in INPUT_RANGES:
        raise VideoInputError(f"input_range must be one of {sorted(INPUT_RANGES)}, got {input_range!r}")
    lo, hi = INPUT_RANGES[input_range]
    x = ((images.to(torch.promote_types(images.dtype, torch.float32)) - lo) / (hi - lo)).clamp(0, 1)
    x = center_crop(resize_short_side(x, size), size).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- model ----
class ImageReward(nn.Module):
    """`vision` (BlipVisionModel) -> `text` (BlipTextModel cross-attending to all image tokens) -> `head` on the
    first text token -> (out - SCORE_MEAN) / SCORE_STD."""

    def __init__(self, vision_cfg, text_cfg, head: nn.Sequential, tokenizer):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.head = head
        self.tokenizer = tokenizer
        self.image_size = vision_cfg.image_size

    @classmethod
    def from_state_dict(cls, state: dict, med: dict, tokenizer, source: str = CHECKPOINT_FILE) -> "ImageReward":
        """Build from a released-layout state dict and med_config dict (strict: every weight must be used)."""
        from accelerate import init_empty_weights

        vision_cfg = vision_config(state)
        text_cfg = text_config(med, vision_cfg.hidden_size)
        if len(tokenizer) != text_cfg.vocab_size:
            raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens with [DEC] and [ENC], but "
                                  f"med_config.json says vocab_size {text_cfg.vocab_size}")
        converted = released_to_transformers(state)
        with init_empty_weights(include_buffers=False):  # weights come from the checkpoint
            model = cls(vision_cfg, text_cfg, build_head(state), tokenizer)
        problem = state_dict_mismatch(model, converted)
        if problem:
            raise CheckpointError(f"{source} does not fit ImageReward: {problem}")
        model.load_state_dict(converted, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, device="cpu", dtype=None) -> "ImageReward":
        """Load `checkpoint_dir` (ImageReward.pt, med_config.json, bert-base-uncased/); dtype: default bf16 on
        CUDA, fp32 elsewhere."""
        folder = resolve_folder(checkpoint_dir)
        med = _read_med_config(folder / MED_CONFIG_FILE)
        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
        state = _load_torch(folder / CHECKPOINT_FILE)
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise CheckpointError(f"{folder / CHECKPOINT_FILE} is not a flat state dict of tensors")
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = cls.from_state_dict(state, med, tokenizer, str(folder / CHECKPOINT_FILE))
        return model.to(device=device, dtype=dtype)

    def tokenize(self, prompts) -> tuple:
        """ImageReward's text input: [CLS] prompt [SEP], padded / truncated to MAX_PROMPT_TOKENS."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise VideoInputError("prompts must be a list of strings, one per image")
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Standardised scores [N] of preprocessed images and their tokenised prompts."""
        weight = next(self.head.parameters())
        device = weight.device
        image_embeds = self.vision(pixel_values=pixel_values.to(device, weight.dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        hidden = self.text(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
        raw = self.head(hidden[:, 0])[:, 0]
        return (raw - SCORE_MEAN) / SCORE_STD

    def score(self, images: torch.Tensor, prompts, input_range: str = "[-1,1]") -> torch.Tensor:
        """Scores [N] of images [N, 3, H, W] (any size) for N prompts; differentiable in `images`."""
        if len(prompts) != images.shape[0]:
            raise VideoInputError(f"need {images.shape[0]} prompts, one per image; got {len(prompts)}")
        input_ids, mask = self.tokenize(prompts)
        scores = self(preprocess(images, self.image_size, input_range), input_ids, mask)
        return scores.to(torch.promote_types(scores.dtype, torch.float32))


# ---- CLI ----
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the short side `size` and the long side int(size·long/short) (torchvision Resize(int))."""
    long = int(size * max(height, width) / min(height, width))
    return (size, long) if height <= width else (long, size)


def read_image(path: Path, size: int | None = None) -> torch.Tensor:
    """An image file -> [1, 3, H, W] float tensor in 0..255. With `size`, first resized (short side `size`) in
    its own mode, as the released package does (THUDM/ImageReward ImageReward.py `_transform`: a PIL bicubic
    Resize before the RGB conversion, so PIL resizes palette images by nearest neighbour and RGBA ones with
    premultiplied alpha); preprocess() then finds the short side at `size` and only centre-crops."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if size is not None:
                height, width = short_side_size(image.height, image.width, size)
                image = image.resize((width, height), Image.BICUBIC)
            array = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise VideoInputError(f"cannot read image {path}: {str(err).splitlines()[0]}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float()


def pick_frame(video: torch.Tensor, frame: str) -> torch.Tensor:
    """Frame `last` or N (0-based; negative counts from the end) of a [1, 3, T, H, W] video -> [1, 3, H, W]."""
    count = video.shape[2]
    if frame == "last":
        index = count - 1
    else:
        try:
            index = int(frame)
        except ValueError:
            raise VideoInputError(f"--frame must be 'last' or an integer, got '{frame}'") from None
        if not -count <= index < count:
            raise VideoInputError(f"--frame {index} is out of range for a video of {count} frames")
    return video[:, :, index]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward_forcing.rewards.imagereward",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", default=f"checkpoints/{FOLDER}",
                        help=f"folder with {CHECKPOINT_FILE}, {MED_CONFIG_FILE} and {TOKENIZER_DIR}/")
    parser.add_argument("--frame", default="last", help="for a video: 'last' (default) or a frame index N")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("input", help="an image (png, jpg, webp, ...) or a video (mp4, ...)")
    parser.add_argument("prompt", help="the text prompt")
    args = parser.parse_args(argv)
    path = Path(args.input)
    if not path.is_file():
        raise VideoInputError(f"input not found: {path}")
    model = ImageReward.from_checkpoint(args.checkpoint_dir, device=args.device)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from reward_forcing.rewards.videoalign import read_video

        image = pick_frame(read_video(path)[0], args.frame)
    else:
        image = read_image(path, model.image_size)
    with torch.no_grad():
        score = model.score(image, [args.prompt], input_range="[0,255]")
    print(f"ImageReward: {score[0].item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
