"""umT5 text encoder: Wan-layout weights through our converter vs transformers' UMT5EncoderModel."""
import pytest
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from reward_forcing.errors import CheckpointError
from reward_forcing.models.text_encoder import (TextEncoder, clean_prompt, transformers_to_wan_t5,
                                                wan_t5_to_transformers)
from reward_forcing.testing.assets import randomise_, write_t5, write_tokenizer

TE_CFG = dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, text_len=16)
PROMPTS = ["a cat", "  waves &amp;amp; seagulls\n\n at   sunset ",
           "the quick brown fox jumps over the lazy dog near a quiet river bank at night"]

# Wan2.1 t5.py names vs transformers' names, written out independently of the module under test:
# transformers name -> Wan name.
WAN_NAMES = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def spec_rename_to_wan(sd):
    out = {}
    for key, value in sd.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif key.startswith("encoder.block."):
            _, _, i, rest = key.split(".", 3)
            out[f"blocks.{i}.{WAN_NAMES[rest]}"] = value
    return out


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    write_tokenizer(root, TE_CFG["vocab_size"])
    return root


def reference_model():
    config = UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False)
    return randomise_(UMT5EncoderModel(config), seed=3).eval()


def test_converters_follow_spec_table():
    sd = reference_model().state_dict()
    wan = transformers_to_wan_t5(sd)
    assert wan.keys() == spec_rename_to_wan(sd).keys()
    assert len(wan) == 2 + 10 * TE_CFG["num_layers"]
    back = wan_t5_to_transformers(wan)
    assert back.keys() == sd.keys()
    assert back["encoder.embed_tokens.weight"] is back["shared.weight"]  # tied
    with pytest.raises(CheckpointError, match="blocks.0.attn.qq.weight"):
        wan_t5_to_transformers({"blocks.0.attn.qq.weight": torch.zeros(1)})


@pytest.mark.filterwarnings("ignore:prompt of 40 tokens is cut")  # truncation is part of what is compared
def test_encode_matches_umt5_with_padding_and_zero_fill(tokenizer_root):
    ref = reference_model()
    torch.save(spec_rename_to_wan(ref.state_dict()), tokenizer_root / "models_t5_umt5-xxl-enc-bf16.pth")
    encoder = TextEncoder.from_wan_folder(tokenizer_root, TE_CFG, dtype=torch.float32)
    out = encoder.encode(PROMPTS)

    tok = AutoTokenizer.from_pretrained(tokenizer_root / "google/umt5-xxl", local_files_only=True)
    batch = tok([clean_prompt(p) for p in PROMPTS], padding="max_length", truncation=True, max_length=16,
                return_tensors="pt")
    with torch.no_grad():
        hidden = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    lengths = batch.attention_mask.sum(1)
    assert lengths.tolist()[0] < 16 and lengths.tolist()[2] == 16  # one padded, one truncated prompt
    assert out.shape == (3, 16, 32)
    for b, n in enumerate(lengths.tolist()):
        assert torch.allclose(out[b, :n], hidden[b, :n], atol=1e-5, rtol=0)
        if n < 16:
            assert out[b, n:].abs().max() == 0
        assert out[b, :n].abs().amin(dim=-1).gt(0).all()
    # The padding rows of the raw encoder are not zero: zero-fill is a real step.
    assert hidden[0, lengths[0]:].abs().max() > 0


def test_tokenizer_offline_padding_and_truncation(tokenizer_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(tokenizer_root / "google/umt5-xxl", local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) <= TE_CFG["vocab_size"]
    encoder = TextEncoder(tok, model=None, text_len=16)
    with pytest.warns(UserWarning) as caught:
        ids, mask = encoder.tokenize(["a cat", PROMPTS[2]])
        encoder.tokenize([PROMPTS[2]])  # the same prompt again: no second warning
    full_length = len(tok(clean_prompt(PROMPTS[2])).input_ids)  # </s> included
    assert [str(w.message) for w in caught] == [
        f"prompt of {full_length} tokens is cut to the text encoder's text_len=16 ({full_length - 16} dropped): "
        f"{clean_prompt(PROMPTS[2])[:57] + '...'!r}"]
    assert ids.shape == mask.shape == (2, 16)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert tok.bos_token_id is None  # umT5 has no BOS
    full = tok(clean_prompt(PROMPTS[2])).input_ids
    assert len(full) > 16
    assert ids[1].tolist() == full[:15] + [1]  # 15 tokens kept + </s>
    assert mask[1].all()


def test_clean_prompt():
    assert clean_prompt("  waves &amp;amp; seagulls\n\n at \t sunset ") == "waves & seagulls at sunset"
    assert clean_prompt("caf\u00c3\u00a9") == "caf\u00e9"  # ftfy mojibake repair


def test_bf16_file_loads_as_bf16_without_copies(tmp_path, tokenizer_root):
    write_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", TE_CFG, dtype=torch.bfloat16)
    (tmp_path / "google").symlink_to(tokenizer_root / "google")
    encoder = TextEncoder.from_wan_folder(tmp_path, TE_CFG, dtype=torch.bfloat16)
    params = list(encoder.model.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in params)
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight
    assert len(params) == len({p.data_ptr() for p in params})  # tied embedding counted once
    out = encoder.encode(["a cat"])
    assert out.dtype == torch.bfloat16
    # values, not just finiteness: the fp32 load of the same file (checked against transformers above) within
    # bf16 rounding. Bug caught: the zero-copy bf16 load putting a tensor into the wrong parameter.
    want = TextEncoder.from_wan_folder(tmp_path, TE_CFG, dtype=torch.float32).encode(["a cat"])
    assert (out.float() - want).abs().max() <= 0.03 * want.abs().max()


def test_bad_files_raise_checkpoint_error(tmp_path, tokenizer_root):
    with pytest.raises(CheckpointError, match="tokenizer folder not found"):
        TextEncoder.from_wan_folder(tmp_path, TE_CFG)
    (tmp_path / "google").symlink_to(tokenizer_root / "google")
    with pytest.raises(CheckpointError, match="T5 weights not found"):
        TextEncoder.from_wan_folder(tmp_path, TE_CFG)
    write_t5(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", TE_CFG)
    with pytest.raises(CheckpointError, match="shape"):
        TextEncoder.from_wan_folder(tmp_path, dict(TE_CFG, d_ff=48))
    with pytest.raises(CheckpointError, match="missing"):
        TextEncoder.from_wan_folder(tmp_path, dict(TE_CFG, num_layers=3))
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        TextEncoder.from_wan_folder(tmp_path, TE_CFG)
