"""Writers of tiny random files in the released layouts (tests and scripts/make_tiny_checkpoints.py).

Sizes always come from the config section passed in; the same loaders as for the real files read them back.
"""
import io
from pathlib import Path

import torch

from reward_forcing.testing.corpus import TOKENIZER_CORPUS
from reward_forcing.testing.imagereward import write_tiny_imagereward
from reward_forcing.testing.videoreward import write_tiny_videoreward


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
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_CORPUS * 4), model_writer=proto,
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
    """A random TAEHV saved as `taew2_1.pth` or `.safetensors` (by suffix); returns its state dict.
    PyTorch's default init already randomises every TAEHV tensor (it has no norms); perturbing further would
    blow activations up through the ~20 stacked convs."""
    from reward_forcing.models.taehv import TAEHV

    torch.manual_seed(seed)
    model = TAEHV(latent_channels=latent_channels, encoder_width=encoder_width, decoder_widths=tuple(decoder_widths))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd


# ---- DiT folders and a whole checkpoint_dir (scripts/make_tiny_checkpoints.py) ----

# The tiny preset's DiT config.json files (configs/tiny.yaml holds the T5, VAE, video and cache sizes).
# Written like the released file: the 1.3B config.json plus `text_dim`, which the real file leaves at 4096.
TINY_WAN_CONFIG = {
    "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 64, "eps": 1e-06, "ffn_dim": 128,
    "freq_dim": 32, "in_dim": 16, "model_type": "t2v", "num_heads": 4, "num_layers": 2, "out_dim": 16,
    "text_dim": 32, "text_len": 64,
}
# The teacher differs in width and depth, as the 14B does, so that its architecture must come from its own file.
TINY_TEACHER_CONFIG = {**TINY_WAN_CONFIG, "dim": 96, "ffn_dim": 192, "num_heads": 6, "num_layers": 3}
TINY_TAEHV_WIDTHS = {"encoder_width": 8, "decoder_widths": (16, 8, 8, 8)}

RELEASE_FOLDER = "Reward-Forcing-T2V-1.3B"
RELEASE_FILE = "rewardforcing.pt"
ODE_INIT_FILE = "ode_init.pt"
QWEN_FOLDER = "Qwen2-VL-2B-Instruct"  # where download_checkpoints.sh puts the VideoReward base files
# Causal Forcing's released chunk-wise teacher and causal ODE init (zhuhz22/Causal-Forcing), where
# download_checkpoints.sh --only causal-forcing puts them.
CAUSAL_FORCING_FILES = ("chunkwise/ar_diffusion.pt", "chunkwise/causal_ode.pt")


def random_wan_state_dict(config: dict, seed: int = 0) -> dict:
    """A WanModel built from `config` with every parameter perturbed (the head and gates included), so that
    outputs are neither zero nor identical across keys; scales stay O(1) so rollouts and decodes stay finite."""
    from reward_forcing.models.wan import WanModel

    torch.manual_seed(seed)
    model = randomise_(WanModel.from_config(config), seed)
    return {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}


def write_wan_folder(folder, config: dict, state_dict: dict, num_shards: int = 1) -> Path:
    """A Wan folder: `config.json` and one `diffusion_pytorch_model.safetensors`, or `num_shards` shards listed
    in `diffusion_pytorch_model.safetensors.index.json` (the 14B layout)."""
    import json

    from safetensors.torch import save_file

    from reward_forcing.checkpoints import WAN_CONFIG, WAN_INDEX, WAN_WEIGHTS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WAN_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if num_shards == 1:
        save_file(state_dict, str(folder / WAN_WEIGHTS))
        return folder
    keys = list(state_dict)
    per_shard = -(-len(keys) // num_shards)
    stem = WAN_WEIGHTS.removesuffix(".safetensors")
    weight_map = {}
    for i in range(num_shards):
        name = f"{stem}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {key: state_dict[key] for key in keys[i * per_shard:(i + 1) * per_shard]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(value.numel() * value.element_size() for value in state_dict.values())
    (folder / WAN_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def write_tiny_checkpoint_dir(output_dir, cfg, seed: int = 0) -> dict:
    """A complete fake `checkpoint_dir` in the released layout, sized by `cfg` (configs/tiny.yaml) and the
    TINY_*_CONFIG dicts: base Wan folder (DiT, T5, tokenizer, VAE), sharded teacher folder, released student,
    ODE init, VideoReward + its Qwen2-VL base files, ImageReward, TAEHV. Returns the main paths."""
    import shutil

    out = Path(output_dir)
    base = write_wan_folder(out / cfg.model_name, TINY_WAN_CONFIG, random_wan_state_dict(TINY_WAN_CONFIG, seed))
    write_tokenizer(base, cfg.text_encoder.vocab_size)
    write_t5(base / "models_t5_umt5-xxl-enc-bf16.pth", cfg.text_encoder, seed)
    write_vae(base / "Wan2.1_VAE.pth", cfg.vae, seed)
    teacher = write_wan_folder(out / cfg.real_name, TINY_TEACHER_CONFIG,
                               random_wan_state_dict(TINY_TEACHER_CONFIG, seed + 1), num_shards=3)

    release = out / RELEASE_FOLDER / RELEASE_FILE
    release.parent.mkdir(parents=True, exist_ok=True)
    student = random_wan_state_dict(TINY_WAN_CONFIG, seed + 2)
    torch.save({f"model.{key}": value for key, value in student.items()}, release)
    ode_init = out / ODE_INIT_FILE
    ode = random_wan_state_dict(TINY_WAN_CONFIG, seed + 3)
    torch.save({"generator": {f"model.{key}": value for key, value in ode.items()}}, ode_init)

    reward = write_tiny_videoreward(out, seed=seed)
    qwen_dir = out / QWEN_FOLDER
    if qwen_dir.exists():
        shutil.rmtree(qwen_dir)
    reward["qwen_dir"].rename(qwen_dir)

    imagereward = write_tiny_imagereward(out, seed=seed)
    taehv = out / cfg.taehv_path
    write_taehv(taehv, TINY_WAN_CONFIG["in_dim"], seed=seed, **TINY_TAEHV_WIDTHS)
    causal_forcing = write_causal_forcing_release(out, seed + 4)
    return {"base": base, "teacher": teacher, "release": release, "ode_init": ode_init,
            "videoreward": reward["root"], "qwen_dir": qwen_dir, "imagereward": imagereward, "taehv": taehv,
            "causal_forcing": causal_forcing[0].parent}


def write_causal_forcing_release(output_dir, seed: int = 0) -> list[Path]:
    """Causal Forcing's released files (CAUSAL_FORCING_FILES) in their layout, {"generator": {"model.<Wan key>": ...}}:
    its trainer/diffusion.py and trainer/ode.py torch.save the FSDP full state dict of the WanDiffusionWrapper
    (utils/wan_wrapper.py), which holds the causal Wan model as `.model`, under "generator". The global RNG is left
    as it was."""
    written = []
    with torch.random.fork_rng():
        for offset, name in enumerate(CAUSAL_FORCING_FILES):
            weights = random_wan_state_dict(TINY_WAN_CONFIG, seed + offset)
            path = Path(output_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"generator": {f"model.{key}": value for key, value in weights.items()}}, path)
            written.append(path)
    return written
