"""Write a tiny random ImageReward in the released layout, fully offline (tests, CPU training runs).

    write_tiny_imagereward(checkpoint_dir) ->
        checkpoint_dir/ImageReward/ImageReward.pt       flat state dict with the released key names
                                                        (blip.visual_encoder.*, blip.text_encoder.*, blip.*_proj,
                                                        mlp.layers.{0,2,4,6,7}.*)
        checkpoint_dir/ImageReward/med_config.json      BERT config in med_config.json's fields
        checkpoint_dir/ImageReward/bert-base-uncased/   a WordPiece tokenizer with BERT's special tokens

The tensors are named and shaped from the released architecture (THUDM/ImageReward models/BLIP/vit.py, med.py,
ImageReward.py), not by converting a transformers model, so the loader's key converter is tested against them.
Load with reward_forcing.rewards.imagereward.ImageReward.from_checkpoint(checkpoint_dir).
"""
import json
import re
from pathlib import Path

import torch

from reward_forcing.testing.corpus import TOKENIZER_CORPUS

# Sizes: the ViT keeps BLIP's 224 px / 16 px patches / 64-wide heads; everything else is small.
TINY_VISION = {"width": 128, "depth": 2, "patch": 16, "image_size": 224, "mlp": 256}
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
             "max_position_embeddings": 40}
TINY_HEAD = (64, 32, 16, 8, 1)  # released: 768 -> 1024 -> 128 -> 64 -> 16 -> 1
HEAD_INDICES = (0, 2, 4, 6, 7)   # nn.Sequential slots of the linears (dropouts between the first four)
BERT_SPECIALS = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tokenizer_vocab(extra_text=()) -> list[str]:
    """BERT-style WordPiece vocabulary: specials, letters, `##` letters, and the corpus' lower-cased words."""
    words = set()
    for line in (*TOKENIZER_CORPUS, *extra_text):
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", line.lower()))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = letters + [f"##{c}" for c in letters] + [",", ".", "-", "!", "?", "'"]
    return list(BERT_SPECIALS) + pieces + sorted(words - set(pieces))


def write_tokenizer(folder, extra_text=()) -> int:
    """A bert-base-uncased-style tokenizer folder; returns its size (ImageReward adds two tokens)."""
    from transformers import BertTokenizer

    vocab = tokenizer_vocab(extra_text)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    (Path(folder) / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return len(vocab)


def med_config(vocab_size: int) -> dict:
    """med_config.json's fields (the released file is bert-base's config plus encoder_width and cross-attention)."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
            "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768,
            "add_cross_attention": True, **TINY_TEXT}


class _Random:
    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=self.gen)

    def linear(self, out: dict, name: str, fan_out: int, fan_in: int):
        out[f"{name}.weight"] = self.normal(fan_out, fan_in, std=fan_in ** -0.5)
        out[f"{name}.bias"] = self.normal(fan_out, std=0.1)

    def norm(self, out: dict, name: str, dim: int):
        out[f"{name}.weight"] = self.normal(dim, std=0.1, mean=1.0)
        out[f"{name}.bias"] = self.normal(dim, std=0.1)


def released_vision(rand: _Random, v: dict) -> dict:
    """timm-style BLIP ViT (vit.py): cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,
    norm2,mlp.fc1,mlp.fc2}, norm."""
    width, grid = v["width"], v["image_size"] // v["patch"]
    out = {"cls_token": rand.normal(1, 1, width, std=0.5), "pos_embed": rand.normal(1, grid * grid + 1, width, std=0.5),
           "patch_embed.proj.weight": rand.normal(width, 3, v["patch"], v["patch"], std=(3 * v["patch"] ** 2) ** -0.5),
           "patch_embed.proj.bias": rand.normal(width, std=0.1)}
    for i in range(v["depth"]):
        block = f"blocks.{i}"
        rand.norm(out, f"{block}.norm1", width)
        rand.linear(out, f"{block}.attn.qkv", 3 * width, width)
        rand.linear(out, f"{block}.attn.proj", width, width)
        rand.norm(out, f"{block}.norm2", width)
        rand.linear(out, f"{block}.mlp.fc1", v["mlp"], width)
        rand.linear(out, f"{block}.mlp.fc2", width, v["mlp"])
    rand.norm(out, "norm", width)
    return out


def released_text(rand: _Random, med: dict, encoder_width: int) -> dict:
    """BLIP's med.py BertModel without pooler: embeddings (word, position, LayerNorm, position_ids buffer) and
    layers with attention, crossattention (keys/values from the image width), intermediate, output."""
    h, ffn = med["hidden_size"], med["intermediate_size"]
    out = {"embeddings.word_embeddings.weight": rand.normal(med["vocab_size"], h),
           "embeddings.position_embeddings.weight": rand.normal(med["max_position_embeddings"], h, std=0.5),
           "embeddings.position_ids": torch.arange(med["max_position_embeddings"]).expand(1, -1).clone()}
    rand.norm(out, "embeddings.LayerNorm", h)
    for i in range(med["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        for attention, kv_width in (("attention", h), ("crossattention", encoder_width)):
            rand.linear(out, f"{layer}.{attention}.self.query", h, h)
            rand.linear(out, f"{layer}.{attention}.self.key", h, kv_width)
            rand.linear(out, f"{layer}.{attention}.self.value", h, kv_width)
            rand.linear(out, f"{layer}.{attention}.output.dense", h, h)
            rand.norm(out, f"{layer}.{attention}.output.LayerNorm", h)
        rand.linear(out, f"{layer}.intermediate.dense", ffn, h)
        rand.linear(out, f"{layer}.output.dense", h, ffn)
        rand.norm(out, f"{layer}.output.LayerNorm", h)
    return out


def released_state_dict(med: dict, vision=TINY_VISION, head=TINY_HEAD, seed: int = 0, proj_dim: int = 16) -> dict:
    """A random ImageReward state dict with the released key names."""
    rand = _Random(seed)
    state = {f"blip.visual_encoder.{k}": v for k, v in released_vision(rand, vision).items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in released_text(rand, med, vision["width"]).items()})
    rand.linear(state, "blip.vision_proj", proj_dim, vision["width"])  # BLIP's ITC projections: unused by the score
    rand.linear(state, "blip.text_proj", proj_dim, med["hidden_size"])
    sizes = (med["hidden_size"], *head)
    for index, fan_in, fan_out in zip(HEAD_INDICES, sizes[:-1], sizes[1:]):
        rand.linear(state, f"mlp.layers.{index}", fan_out, fan_in)
    return state


def write_tiny_imagereward(checkpoint_dir, seed: int = 0, extra_text=()) -> Path:
    """Write `checkpoint_dir/ImageReward/`; returns that folder."""
    from reward_forcing.rewards.imagereward import ADDED_TOKENS, CHECKPOINT_FILE, FOLDER, MED_CONFIG_FILE, TOKENIZER_DIR

    folder = Path(checkpoint_dir) / FOLDER
    base_vocab = write_tokenizer(folder / TOKENIZER_DIR, extra_text)
    added = sum(len(v) if isinstance(v, list) else 1 for v in ADDED_TOKENS.values())
    med = med_config(base_vocab + added)
    (folder / MED_CONFIG_FILE).write_text(json.dumps(med, indent=2) + "\n")
    torch.save(released_state_dict(med, seed=seed), folder / CHECKPOINT_FILE)
    return folder
