"""VideoAlign's VideoReward: Qwen2-VL-2B with a bias-free scalar head read at three special tokens.

score(videos, prompts) -> VQ (visual quality), MQ (motion quality), TA (text alignment), each [B].
The rubric prompt puts one special token at the end of each section; the head is applied to the final hidden
state at those positions (as KwaiVGI/VideoAlign trained it). The decoder always gets explicit sequential
positions arange(L) on all
three M-RoPE axes, as VideoAlign trained it (it passed inputs_embeds only, so no M-RoPE was ever used).

CLI: python -m reward_forcing.rewards.videoalign --checkpoint_dir checkpoints/VideoReward \
         --qwen_dir checkpoints/Qwen2-VL-2B-Instruct video.mp4 "a prompt"
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from reward_forcing.checkpoints import state_dict_mismatch
from reward_forcing.errors import CheckpointError, run_cli
from reward_forcing.rewards import qwen_video
from reward_forcing.rewards import videoalign_checkpoint as ckpt
from reward_forcing.rewards.qwen_video import VideoInputError, VisionSpec

DIMENSIONS = ("VQ", "MQ", "TA")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None


def vision_spec(qwen_dir: Path, max_pixels: int) -> VisionSpec:
    pre = _read_json(qwen_dir / "preprocessor_config.json")
    factor = pre["patch_size"] * pre["merge_size"]
    return VisionSpec(
        patch_size=pre["patch_size"],
        temporal_patch_size=pre["temporal_patch_size"],
        merge_size=pre["merge_size"],
        image_mean=tuple(pre["image_mean"]),
        image_std=tuple(pre["image_std"]),
        min_pixels=min(qwen_video.VIDEO_MIN_TOKENS * factor**2, max_pixels),
        max_pixels=max_pixels,
    )


def _load_tokenizer(step_dir: Path, qwen_dir: Path):
    """The checkpoint's own tokenizer (has the reward tokens), else the base one with the tokens added."""
    from transformers import AutoTokenizer

    folder = step_dir / "tokenizer"
    source = folder if (folder / "tokenizer_config.json").is_file() else qwen_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), padding_side="right")
    except Exception as err:  # transformers raises many types for a broken folder
        raise CheckpointError(f"cannot load a tokenizer from {source}: {str(err).splitlines()[0]}") from None
    if source == qwen_dir:
        tokenizer.add_special_tokens({"additional_special_tokens": list(ckpt.REWARD_TOKENS)})
    if not tokenizer.chat_template:
        for name in ("chat_template.jinja", "chat_template.json"):
            path = qwen_dir / name
            if path.is_file():
                text = path.read_text()
                tokenizer.chat_template = json.loads(text)["chat_template"] if name.endswith("json") else text
                break
        else:
            raise CheckpointError(f"no chat template in {source} nor in {qwen_dir}")
    return tokenizer


def _build_backbone(qwen_dir: Path, vocab_size: int, attn_implementation: str):
    from accelerate import init_empty_weights
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    try:
        config = Qwen2VLConfig.from_pretrained(str(qwen_dir))
    except Exception as err:
        raise CheckpointError(f"cannot read the Qwen2-VL config in {qwen_dir}: {str(err).splitlines()[0]}") from None
    config.text_config.vocab_size = vocab_size  # VideoAlign resized the embeddings for its reward tokens
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    # Parameters on the meta device (weights come from the checkpoint); RoPE buffers are computed as usual.
    with init_empty_weights(include_buffers=False):
        return Qwen2VLModel(config), config


class VideoReward(nn.Module):
    """Qwen2-VL backbone (`model`) + `rm_head` Linear(hidden -> output_dim, bias=False)."""

    def __init__(self, backbone, tokenizer, template: str, spec: VisionSpec, data_config: dict,
                 inference_config=None, output_dim: int = 1):
        super().__init__()
        self.model = backbone
        self.rm_head = nn.Linear(backbone.config.text_config.hidden_size, output_dim, bias=False,
                                 device=backbone.get_input_embeddings().weight.device)
        self.tokenizer = tokenizer
        self.template = ckpt.check_template(template)
        self.spec = spec
        self.sample_fps = data_config.get("fps", 2.0)
        self.inference_config = inference_config
        self.reward_ids = tokenizer.convert_tokens_to_ids(list(ckpt.REWARD_TOKENS))
        self.video_token_id = backbone.config.video_token_id
        vocab = backbone.config.text_config.vocab_size
        for token, token_id in zip(ckpt.REWARD_TOKENS, self.reward_ids):
            if token_id is None or token_id == tokenizer.unk_token_id or not 0 <= token_id < vocab:
                raise CheckpointError(f"the tokenizer has no usable id for {token} (got {token_id}, vocab {vocab})")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir, qwen_dir, step=None, device="cpu", dtype=None, template_text=None,
                        verify_template=True, attn_implementation="sdpa"):
        """Load `checkpoint_dir` (VideoReward root: model_config.json + checkpoint-<step>/model.pth).

        qwen_dir: local Qwen2-VL-2B-Instruct folder (config.json, preprocessor_config.json, tokenizer files).
        dtype: default bf16 on CUDA, fp32 elsewhere.
        template_text: a rubric to use instead of `prompt_template.py` (tests, custom rubrics); it must keep the
            structure (one `{text_prompt}`, the three reward tokens in order) but is not hash-checked.
        verify_template: False reads `prompt_template.py` without the sha256 check (tiny test checkpoints).
        """
        root = ckpt.resolve_root(checkpoint_dir)
        qwen_dir = Path(qwen_dir)
        if not (qwen_dir / "config.json").is_file():
            raise CheckpointError(f"no Qwen2-VL base config.json in {qwen_dir}")
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config = ckpt.load_model_config(root)
        step_dir = ckpt.find_step_dir(root, step)
        if template_text is None:
            expected = ckpt.TEMPLATE_SHA256 if verify_template else None
            template_text = ckpt.read_template(root / ckpt.TEMPLATE_FILE, expected)

        state = ckpt.load_state_dict(step_dir)
        state = ckpt.remap_old_layout(state)
        state = ckpt.merge_lora(state, ckpt.lora_scale(config["peft_lora_config"]))
        state = ckpt.strip_peft_prefix(state)
        state.pop("lm_head.weight", None)  # tied to the embeddings and unused by the reward head
        embed_key = "model.language_model.embed_tokens.weight"
        if embed_key not in state or "rm_head.weight" not in state:
            raise CheckpointError(f"{step_dir / 'model.pth'} lacks {embed_key} or rm_head.weight")
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

        backbone, _ = _build_backbone(qwen_dir, state[embed_key].shape[0], attn_implementation)
        data_config = config["data_config"]
        model = cls(backbone, _load_tokenizer(step_dir, qwen_dir), template_text,
                    vision_spec(qwen_dir, data_config["max_frame_pixels"]), data_config,
                    config.get("inference_config"), output_dim=state["rm_head.weight"].shape[0])
        model.load_weights(state, str(step_dir / "model.pth"))
        return model.to(device).eval().requires_grad_(False)

    def load_weights(self, state: dict, source: str):
        """Strict load into parameters that may still be on the meta device."""
        problem = state_dict_mismatch(self, state)
        if problem:
            raise CheckpointError(f"{source} does not fit {type(self).__name__}: {problem}")
        self.load_state_dict(state, strict=True, assign=True)

    # ---- inputs ----
    def _prompt_ids(self, prompt: str, num_video_tokens: int) -> list:
        text = ckpt.fill_template(self.template, prompt)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        chat = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(chat, add_special_tokens=False)["input_ids"]
        if ids.count(self.video_token_id) != 1:
            raise VideoInputError("the prompt must not contain the video placeholder token")
        k = ids.index(self.video_token_id)
        return ids[:k] + [self.video_token_id] * num_video_tokens + ids[k + 1:]

    def prepare(self, videos, prompts, input_range="[-1,1]", fps=16.0, sample="fps", size=None, quantise=True) -> dict:
        """Model inputs for videos [B, 3, T, H, W] and B prompts; text right-padded with the pad token."""
        if not torch.is_tensor(videos) or videos.ndim != 5 or videos.shape[1] != 3:
            shape = tuple(videos.shape) if torch.is_tensor(videos) else type(videos).__name__
            raise VideoInputError(f"videos must be a [B, 3, T, H, W] tensor, got {shape}")
        if isinstance(prompts, str) or len(prompts) != videos.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise VideoInputError(f"need a list of {videos.shape[0]} prompt strings, one per video")
        if sample not in ("fps", "all"):
            raise VideoInputError(f"sample must be 'fps' (VideoAlign's {self.sample_fps} fps) or 'all', got {sample!r}")
        pixels = qwen_video.to_unit255(videos, input_range)
        patches, grids, ids = [], [], []
        for video, prompt in zip(pixels, prompts):
            p, grid = qwen_video.preprocess_video(video, self.spec, fps, self.sample_fps if sample == "fps" else None,
                                                  size, quantise)
            patches.append(p)
            grids.append(grid)
            ids.append(self._prompt_ids(prompt, grid[0] * grid[1] * grid[2] // self.spec.merge_size**2))
        length = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (length - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values_videos": torch.cat(patches),
                "video_grid_thw": torch.tensor(grids)}

    def _reward_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        columns = []
        for token, token_id in zip(ckpt.REWARD_TOKENS, self.reward_ids):
            hits = input_ids == token_id
            if not bool((hits.sum(1) == 1).all()):
                raise VideoInputError(f"each input must contain {token} exactly once (a prompt may not contain it)")
            columns.append(hits.int().argmax(1))
        return torch.stack(columns, 1)  # [B, 3] in VQ, MQ, TA order

    # ---- model ----
    def forward(self, input_ids, attention_mask, pixel_values_videos, video_grid_thw) -> torch.Tensor:
        """Raw scores [B, 3] = (VQ, MQ, TA)."""
        device = self.rm_head.weight.device
        batch, length = input_ids.shape
        position_ids = torch.arange(length, device=device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids,
            pixel_values_videos=pixel_values_videos.to(device), video_grid_thw=video_grid_thw.to(device),
            use_cache=False,
        ).last_hidden_state
        positions = self._reward_positions(input_ids).to(device)
        rows = hidden[torch.arange(batch, device=device)[:, None], positions]  # [B, 3, D]
        logits = self.rm_head(rows)  # [B, 3, output_dim]
        if logits.shape[-1] == len(DIMENSIONS):  # one output per dimension: token i reads output i
            return logits.diagonal(dim1=1, dim2=2)
        return logits[..., 0]

    def score(self, videos, prompts, input_range="[-1,1]", fps=16.0, sample="fps", size=None,
              differentiable=False, quantise=True) -> dict:
        """Per-video scores: VQ, MQ, TA, Overall (= VQ+MQ+TA) and the same normalised (`*_norm`), each [B].

        input_range: '[-1,1]' (generator pixels), '[0,1]' or '[0,255]'. fps: the video's frame rate.
        sample: 'fps' samples frames at VideoAlign's training rate (model_config fps); 'all' keeps every frame
            (the Reward-Forcing code path). size: (H, W) resize target; None = smart resize to the pixel budget.
        differentiable: keep the graph so gradients reach `videos` (reward fine-tuning); no_grad otherwise.
        quantise: resize on uint8 levels, clamped to 0..255, as VideoAlign was trained; False resizes the floats as
            given (the Reward-Forcing code path).
        """
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            raw = self(**self.prepare(videos, prompts, input_range, fps, sample, size, quantise)).float()
        return self.outputs(raw)

    def outputs(self, raw: torch.Tensor) -> dict:
        out = {name: raw[:, i] for i, name in enumerate(DIMENSIONS)}
        for name in DIMENSIONS:
            cfg = self.inference_config
            # Without statistics the normalised score is the raw one, as in VideoAlign.
            out[f"{name}_norm"] = (out[name] - cfg[f"{name}_mean"]) / cfg[f"{name}_std"] if cfg else out[name]
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        out["Overall_norm"] = out["VQ_norm"] + out["MQ_norm"] + out["TA_norm"]
        return out


# ---- CLI ----
def read_video(path) -> tuple:
    """mp4 -> ([1, 3, T, H, W] uint8-valued float tensor, fps)."""
    import imageio.v2 as imageio
    import numpy as np

    try:
        reader = imageio.get_reader(str(path), "ffmpeg")
        fps = float(reader.get_meta_data().get("fps") or 0)
        frames = np.stack([frame for frame in reader])
        reader.close()
    except Exception as err:  # imageio/ffmpeg report unreadable files in several ways
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise VideoInputError(f"cannot read video {path}: {reason}") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or fps <= 0:
        raise VideoInputError(f"{path} is not an RGB video with a frame rate")
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float(), fps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward_forcing.rewards.videoalign",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", default="checkpoints/VideoReward", help="VideoReward folder")
    parser.add_argument("--qwen_dir", default="checkpoints/Qwen2-VL-2B-Instruct", help="local Qwen2-VL-2B-Instruct")
    parser.add_argument("--step", type=int, default=None, help="checkpoint-<step> to load (default: highest)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--all_frames", action="store_true", help="score every frame instead of sampling at 2 fps")
    parser.add_argument("--unverified_template", action="store_true",
                        help="accept a prompt_template.py that is not VideoAlign's (custom rubrics, tiny checkpoints)")
    parser.add_argument("video", help="an mp4 file")
    parser.add_argument("prompt", help="the text prompt of the video")
    args = parser.parse_args(argv)
    if not Path(args.video).is_file():
        raise VideoInputError(f"video not found: {args.video}")
    video, fps = read_video(args.video)
    model = VideoReward.from_checkpoint(args.checkpoint_dir, args.qwen_dir, step=args.step, device=args.device,
                                       verify_template=not args.unverified_template)
    scores = model.score(video, [args.prompt], input_range="[0,255]", fps=fps,
                         sample="all" if args.all_frames else "fps")
    for name in (*DIMENSIONS, "Overall"):
        print(f"{name}: {scores[name][0].item():.4f} (normalised {scores[name + '_norm'][0].item():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
