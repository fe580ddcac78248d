"""umT5 text encoder: Wan's `models_t5_umt5-xxl-enc-bf16.pth` run through transformers' UMT5EncoderModel.

Output rows past each prompt's true length (its `</s>` included) are zero-filled, as Wan does
(wan/modules/t5.py of Wan2.1).
"""
import html
import re
import warnings
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from reward_forcing.errors import CheckpointError

TOKENIZER_SUBDIR = "google/umt5-xxl"
WEIGHTS_NAME = "models_t5_umt5-xxl-enc-bf16.pth"

# Per-block renames, Wan -> transformers' UMT5EncoderModel.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def _rename(sd: dict, top: dict, block_re, block: dict, block_prefix: str, layout: str) -> dict:
    """Rename a T5 encoder state dict: top-level keys by `top`, `<n>.<name>` block keys by `block`."""
    out = {}
    for key, value in sd.items():
        match = block_re.match(key)
        if key in top:
            out[top[key]] = value
        elif match and match.group(2) in block:
            out[f"{block_prefix}.{match.group(1)}.{block[match.group(2)]}"] = value
        else:
            raise CheckpointError(f"unexpected key '{key}' in {layout} state dict")
    return out


def wan_t5_to_transformers(sd: dict) -> dict:
    """Wan T5 encoder keys -> UMT5EncoderModel keys; the embedding is emitted for both tied names."""
    out = _rename(sd, _TOP_KEYS, _BLOCK_RE, _BLOCK_KEYS, "encoder.block", "Wan T5")
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def transformers_to_wan_t5(sd: dict) -> dict:
    """UMT5EncoderModel keys -> Wan T5 encoder keys (the tied `encoder.embed_tokens` copy is dropped)."""
    sd = {key: value for key, value in sd.items() if key != "encoder.embed_tokens.weight"}
    top = {v: k for k, v in _TOP_KEYS.items()}
    block = {v: k for k, v in _BLOCK_KEYS.items()}
    return _rename(sd, top, _HF_BLOCK_RE, block, "blocks", "UMT5EncoderModel")


def umt5_config(te_cfg) -> UMT5Config:
    """UMT5Config from the `text_encoder` config section (text_len is the tokenizer's, not the model's)."""
    return UMT5Config(
        vocab_size=te_cfg["vocab_size"],
        d_model=te_cfg["d_model"],
        d_kv=te_cfg["d_kv"],
        d_ff=te_cfg["d_ff"],
        num_layers=te_cfg["num_layers"],
        num_heads=te_cfg["num_heads"],
        relative_attention_num_buckets=te_cfg["relative_attention_num_buckets"],
        relative_attention_max_distance=te_cfg["relative_attention_max_distance"],
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy, HTML unescape twice, whitespace collapsed."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_umt5_encoder(path, te_cfg, device="cpu", dtype=torch.float32) -> UMT5EncoderModel:
    """Build the encoder on the meta device and adopt the file's tensors (cast once to `dtype`), so a bf16
    file run in bf16 is never materialised in fp32 and no random init is spent on 5.7 B parameters."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"T5 weights not found: {path}")
    try:
        wan_sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated or non-zip files raise a variety of errors
        raise CheckpointError(f"cannot read T5 weights {path}: {str(err).splitlines()[0]}") from None
    sd = {k: v.to(device=device, dtype=dtype) for k, v in wan_t5_to_transformers(wan_sd).items()}
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(te_cfg))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"T5 weights {path} do not match the text_encoder config: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in sd.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"T5 weight '{key}' has shape {tuple(value.shape)}, "
                                  f"config expects {tuple(expected[key].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # assign=True replaced the tied parameter; re-tie it
    return model.eval().requires_grad_(False)


class TextEncoder(torch.nn.Module):
    """Tokenizer + umT5 encoder: `encode(prompts) -> [B, text_len, d_model]`, zero past each true length."""

    def __init__(self, tokenizer, model: UMT5EncoderModel, text_len: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.text_len = text_len
        self._warned = set()  # prompts already reported as cut

    @classmethod
    def from_wan_folder(cls, folder, te_cfg, device="cpu", dtype=torch.float32):
        folder = Path(folder)
        tok_dir = folder / TOKENIZER_SUBDIR
        if not tok_dir.is_dir():
            raise CheckpointError(f"tokenizer folder not found: {tok_dir}")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = load_umt5_encoder(folder / WEIGHTS_NAME, te_cfg, device, dtype)
        return cls(tokenizer, model, te_cfg["text_len"])

    def tokenize(self, prompts):
        """Ids and mask [B, text_len]: `</s>` appended, truncation keeps text_len - 1 tokens + `</s>`."""
        cleaned = [clean_prompt(p) for p in prompts]
        self._warn_truncated(cleaned)
        batch = self.tokenizer(cleaned, padding="max_length", truncation=True,
                               max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return batch.input_ids, batch.attention_mask

    def _warn_truncated(self, prompts) -> None:
        """One warning per prompt longer than text_len tokens (its `</s>` included): the rest is not seen."""
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True).input_ids]
        for prompt, length in zip(prompts, lengths):
            if length > self.text_len and prompt not in self._warned:
                self._warned.add(prompt)
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(f"prompt of {length} tokens is cut to the text encoder's text_len={self.text_len} "
                              f"({length - self.text_len} dropped): {shown!r}", stacklevel=3)

    @torch.no_grad()
    def encode(self, prompts) -> torch.Tensor:
        device = self.model.shared.weight.device
        ids, mask = self.tokenize(list(prompts))
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = (torch.arange(ids.shape[1], device=device)[None, :] < mask.sum(1, keepdim=True))
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))

    def forward(self, prompts):
        return self.encode(prompts)
