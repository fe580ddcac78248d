"""Write a tiny random VideoReward checkpoint in the released layout, fully offline (tests, CPU training runs).

    write_tiny_videoreward(out_dir) ->
        out_dir/Qwen2-VL-tiny/    config.json (flat, as the Qwen2-VL-2B-Instruct file), preprocessor_config.json,
                                  tokenizer.json, tokenizer_config.json, chat_template.jinja
        out_dir/VideoReward/      model_config.json, prompt_template.py (a synthetic rubric, not VideoAlign's),
                                  checkpoint-<step>/model.pth (PEFT-wrapped, transformers <= 4.51 key names,
                                  unmerged LoRA), checkpoint-<step>/tokenizer/

Load it with VideoReward.from_checkpoint(root / "VideoReward", root / "Qwen2-VL-tiny", verify_template=False).
Sizes are tiny (186,688 parameters in all); the code paths are the real model's.
"""
import json
from pathlib import Path

import torch

# Qwen2-VL special tokens (ids follow the 500-token byte-level vocabulary in this order).
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
PAD_TOKEN = "<|endoftext|>"
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
BASE_VOCAB = 500

# Qwen2-VL's chat layout (default system turn, vision placeholders, generation prompt), written for this file.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Same structure as VideoAlign's rubric: three sections, one reward token each, the prompt in the last one.
TINY_TEMPLATE = (
    "\nRate this video on three separate criteria.\n"
    "Visual quality: is it sharp and clean?\nRating of Visual Quality: <|VQ_reward|>\nEND\n"
    "Motion quality: is the motion smooth and natural?\nRating of Motion Quality: <|MQ_reward|>\nEND\n"
    "Text alignment: does it match the prompt?\nTextual prompt - {text_prompt}\n"
    "Rating of Text Alignment: <|TA_reward|>\nEND\n"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LORA_EXCLUDE = ("lm_head", "rm_head", "embed_tokens", "visual")


def _corpus():
    # Enough distinct letter pairs and words for the BPE trainer to fill BASE_VOCAB tokens.
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [a + b + c for a in letters for b in letters[:12] for c in "aeiou"]
    return [TINY_TEMPLATE, " ".join(words), " ".join(w.capitalize() for w in words)]


def build_tokenizer():
    """A byte-level BPE tokenizer with BASE_VOCAB tokens, then Qwen2-VL's special tokens and the reward tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise RuntimeError(f"tiny BPE vocabulary has {tok.get_vocab_size()} tokens, expected {BASE_VOCAB}")
    specials = (*VISION_TOKENS, PAD_TOKEN, *REWARD_TOKENS, *CHAT_TOKENS)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=CHAT_TOKENS[1],
                                   additional_special_tokens=list(REWARD_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _save_tokenizer(tokenizer, folder: Path):
    tokenizer.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(config, indent=2))


def tiny_qwen_config(tokenizer, vocab_size=512) -> dict:
    """The tiny Qwen2-VL, written flat like the released Qwen2-VL-2B-Instruct config.json."""
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))))
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "max_position_embeddings": 32768, "max_window_layers": 2, "sliding_window": 32768,
        "use_sliding_window": False, "tie_word_embeddings": True, "torch_dtype": "float32",
        "bos_token_id": pad, "eos_token_id": tokenizer.convert_tokens_to_ids(CHAT_TOKENS[1]), "pad_token_id": pad,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                          "in_chans": 3, "patch_size": 14, "spatial_patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2},
    }


def is_lora_target(module_name: str, module) -> bool:
    """VideoAlign's rule: every Linear/Embedding whose name contains none of the excluded words."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not any(
        word in module_name for word in LORA_EXCLUDE)


def to_released_key(key: str) -> str:
    """A transformers >= 4.52 key of Qwen2VLForConditionalGeneration -> its PEFT-wrapped <= 4.51 name."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if key.startswith(new):
            key = old + key[len(new):]
            break
    return "base_model.model." + key


def released_state_dict(model, rm_head, rank=4, lora_std=0.05, seed=0) -> dict:
    """`model` (Qwen2VLForConditionalGeneration) + rm_head as VideoAlign's model.pth: random, unmerged LoRA."""
    gen = torch.Generator().manual_seed(seed)
    targets = {name for name, module in model.named_modules() if is_lora_target(name, module)}
    state = {}
    params = dict(model.state_dict())
    params["lm_head.weight"] = model.get_output_embeddings().weight  # saved even though tied
    params["rm_head.weight"] = rm_head.weight
    for key, value in params.items():
        module, _, leaf = key.rpartition(".")
        name = to_released_key(key)
        if module in targets:
            prefix = to_released_key(module)
            state[f"{prefix}.base_layer.{leaf}"] = value.detach().clone()
            if leaf == "weight":
                out_f, in_f = value.shape
                state[f"{prefix}.lora_A.default.weight"] = torch.randn(rank, in_f, generator=gen) * lora_std
                state[f"{prefix}.lora_B.default.weight"] = torch.randn(out_f, rank, generator=gen) * lora_std
        else:
            state[name] = value.detach().clone()
    return state


def write_tiny_videoreward(out_dir, step=8, max_frame_pixels=28 * 28 * 8, seed=0, rank=4, alpha=8) -> dict:
    """Write the tiny layout under `out_dir`; returns its paths and the rubric text."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    out_dir = Path(out_dir)
    qwen_dir, root = out_dir / "Qwen2-VL-tiny", out_dir / "VideoReward"
    step_dir = root / f"checkpoint-{step}"
    for folder in (qwen_dir, step_dir):
        folder.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    _save_tokenizer(tokenizer, qwen_dir)
    _save_tokenizer(tokenizer, step_dir / "tokenizer")
    config = tiny_qwen_config(tokenizer)
    (qwen_dir / "config.json").write_text(json.dumps(config, indent=2))
    (qwen_dir / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, indent=2))

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config)).eval()
    rm_head = torch.nn.Linear(config["hidden_size"], 1, bias=False)
    torch.save(released_state_dict(model, rm_head, rank, seed=seed), step_dir / "model.pth")

    (root / "prompt_template.py").write_text(f"DETAILED_PROMPT_WITH_SPECIAL_TOKEN = {TINY_TEMPLATE!r}\n")
    (root / "model_config.json").write_text(json.dumps({
        "data_config": {"meta_data": "train.csv", "data_dir": "videos", "max_frame_pixels": max_frame_pixels,
                        "num_frames": None, "fps": 2.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "sample_type": "uniform"},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1,
                         "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": rank, "lora_alpha": alpha,
                             "lora_dropout": 0.05, "use_rslora": False,
                             "lora_namespan_exclude": list(LORA_EXCLUDE)},
        "training_args": {},
        "inference_config": {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5,
                             "TA_mean": 1.0, "TA_std": 4.0},
    }, indent=2))
    return {"root": root, "qwen_dir": qwen_dir, "step_dir": step_dir, "template": TINY_TEMPLATE}


if __name__ == "__main__":
    import sys

    paths = write_tiny_videoreward(sys.argv[1] if len(sys.argv) > 1 else "tiny_videoreward")
    print(f"wrote {paths['root']} and {paths['qwen_dir']}")
