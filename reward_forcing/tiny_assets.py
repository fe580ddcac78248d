"""Writers of tiny random files in the released layouts (tests and scripts/make_tiny_checkpoints.py).

Sizes always come from the config section passed in; the same loaders as for the real files read them back.
"""
import io
from pathlib import Path

import torch

# Enough distinct words for SentencePiece to learn a few hundred pieces in well under a second.
_TOKENIZER_CORPUS = [
    "a cat walks slowly across the green grass in warm afternoon sunlight",
    "the quick brown fox jumps over the lazy dog near a quiet river bank",
    "waves crash on a rocky beach at sunset while seagulls circle overhead",
    "a red sports car drives through a neon lit city street at night in the rain",
    "an astronaut floats inside a space station, looking out at the blue earth",
    "close-up of a chef chopping fresh vegetables on a wooden kitchen board",
    "a golden retriever puppy plays with a ball in a snowy backyard",
    "timelapse of clouds moving over snowy mountain peaks and pine forests",
    "a woman in a yellow dress dances joyfully under cherry blossom trees",
    "drone footage of a winding road through autumn hills, vivid colors, 4k",
]


def randomise_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (gammas/norm weights around 1, biases around 0) so that a key mixed up by a
    converter changes the output; default inits leave norms at 1 and biases at 0, hiding such mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return module


def write_tokenizer(folder, vocab_size: int) -> Path:
    """A umT5-style tokenizer folder (`<folder>/google/umt5-xxl/`): a SentencePiece unigram model trained on a
    small corpus, ids pad 0 / eos 1 / unk 2, no BOS, saved by transformers so AutoTokenizer loads it offline."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    from reward_forcing.models.text_encoder import TOKENIZER_SUBDIR

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TOKENIZER_CORPUS * 4), model_writer=proto,
                                   vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    out = Path(folder) / TOKENIZER_SUBDIR
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(out)
    return out


def write_t5(path, te_cfg, seed: int = 0, dtype=torch.bfloat16) -> dict:
    """A random umT5 encoder saved as a Wan-layout `models_t5_umt5-xxl-enc-bf16.pth`; returns the
    transformers-layout fp32 state dict it was made from."""
    from transformers import UMT5EncoderModel

    from reward_forcing.models.text_encoder import transformers_to_wan_t5, umt5_config

    torch.manual_seed(seed)
    model = randomise_(UMT5EncoderModel(umt5_config(te_cfg)), seed)
    sd = model.state_dict()
    wan = {k: v.to(dtype).clone() for k, v in transformers_to_wan_t5(sd).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(wan, path)
    return sd


def write_vae(path, vae_cfg, seed: int = 0) -> dict:
    """A random Wan VAE saved as a Wan-layout `Wan2.1_VAE.pth` (fp32); returns the diffusers-layout state dict."""
    from reward_forcing.models.vae import build_autoencoder, diffusers_to_wan_vae

    torch.manual_seed(seed)
    sd = randomise_(build_autoencoder(vae_cfg), seed).state_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in diffusers_to_wan_vae(sd, vae_cfg["num_res_blocks"]).items()}, path)
    return sd


def write_taehv(path, latent_channels: int, encoder_width: int, decoder_widths, seed: int = 0) -> dict:
    """A random TAEHV saved as `taew2_1.pth` or `.safetensors` (by suffix); returns its state dict."""
    from reward_forcing.models.taehv import TAEHV

    torch.manual_seed(seed)
    model = TAEHV(latent_channels=latent_channels, encoder_width=encoder_width, decoder_widths=tuple(decoder_widths))
    sd = {k: v.clone() for k, v in randomise_(model, seed).state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd
