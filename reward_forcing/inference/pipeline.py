"""Text to video frames: text encoder -> StreamingGenerator -> streaming decoder, one chunk at a time; optionally
from a picture (image-to-video) or continuing a video (reward_forcing/inference/conditioning.py)."""
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from reward_forcing.checkpoints import (WeightsSource, asset_path, load_generator_weights, load_into, load_wan_folder,
                                        read_wan_config)
from reward_forcing.distributed import compute_dtype
from reward_forcing.errors import CheckpointError, ConfigError
from reward_forcing.inference.conditioning import Conditioning, ConditioningError, VideoStart, encode_frames
from reward_forcing.inference.generator import StreamingGenerator, latent_size
from reward_forcing.inference.overlap import overlapped
from reward_forcing.models.causal_wan import CausalWanModel
from reward_forcing.models.decoder import load_decoder
from reward_forcing.video import to_uint8_frames


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` is this rank's GPU when CUDA is available, else the CPU; a bare `cuda` also means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"inference.device={name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"inference.device={name} but CUDA is not available")
    return device


def load_student(cfg, checkpoint_path=None, use_ema=False) -> tuple[CausalWanModel, WeightsSource]:
    """The causal student and a description of the weights read: architecture from the base folder's
    config.json, weights from `checkpoint_path` (flat, `generator` or `generator_ema`, or the EMA export
    beside a generator.safetensors), or the base folder's own weights when none is given."""
    folder = asset_path(cfg.checkpoint_dir, cfg.model_name)
    model = CausalWanModel.from_config(read_wan_config(folder), num_frame_per_block=int(cfg.num_frame_per_block),
                                       local_attn_size=int(cfg.local_attn_size))
    if checkpoint_path is None:
        state_dict, source = load_wan_folder(folder)[1], WeightsSource(folder)
    else:
        state_dict, source = load_generator_weights(checkpoint_path, use_ema=use_ema)
    return load_into(model, state_dict, str(source)).eval().requires_grad_(False), source


def check_text_len(cfg, model) -> None:
    """The text encoder's output (text_encoder.text_len tokens) must fit the DiT's text_len (its config.json)."""
    if int(cfg.text_encoder.text_len) > model.text_len:
        config = asset_path(cfg.checkpoint_dir, cfg.model_name) / "config.json"
        raise ConfigError(f"text_encoder.text_len={cfg.text_encoder.text_len} is longer than the text_len="
                          f"{model.text_len} of {config}; lower it, or re-make tiny checkpoints with "
                          "scripts/make_tiny_checkpoints.py")


def load_text_encoder(cfg, device, dtype):
    from reward_forcing.models.text_encoder import TextEncoder
    return TextEncoder.from_wan_folder(asset_path(cfg.checkpoint_dir, cfg.model_name), cfg.text_encoder, device=device, dtype=dtype)


def compile_if_configured(generator, cfg, device):
    """`compile: true`: torch.compile the generator's steady streaming step (StreamingGenerator.compile), with
    CUDA graphs ("reduce-overhead") on a GPU. Returns the generator."""
    if cfg.compile:
        generator.compile(mode="reduce-overhead" if torch.device(device).type == "cuda" else None)
    return generator


RELEASED_CHECKPOINT = "Reward-Forcing-T2V-1.3B/rewardforcing.pt"  # where download_checkpoints.sh puts it


def _existing_dir(checkpoint_dir) -> Path:
    """`checkpoint_dir` as an absolute folder; a relative one is resolved against the working directory."""
    path = Path(checkpoint_dir).expanduser()
    absolute = path if path.is_absolute() else Path.cwd() / path
    if not absolute.is_dir():
        raise CheckpointError(f"checkpoint_dir {str(checkpoint_dir)!r} not found: looked for {absolute} (relative "
                              f"paths are resolved against the working directory, {Path.cwd()})")
    return absolute.resolve()


def _checkpoint_file(checkpoint_dir: Path, checkpoint_path) -> Path:
    """None: the released student under checkpoint_dir. Relative: under checkpoint_dir, else the working directory."""
    given = Path(checkpoint_path if checkpoint_path is not None else RELEASED_CHECKPOINT).expanduser()
    candidates = [given] if given.is_absolute() else [checkpoint_dir / given, Path.cwd() / given]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise CheckpointError(f"checkpoint {str(given)!r} not found: looked for {' and '.join(map(str, candidates))}")


class VideoPipeline:
    """Text to video frames, chunk by chunk. From Python:

        pipe = VideoPipeline.from_pretrained("checkpoints")
        video = pipe("a red fox", num_frames=21, seed=0)      # uint8 [81, 480, 832, 3]
        for frames in pipe.stream("a red fox", num_frames=21, seed=0): ...
        video = pipe("the fox runs", image="fox.png")          # starts from the picture (its frame 0)
        more = pipe("the fox runs on", video="fox.mp4")        # continues the video: its new frames only
    """

    def __init__(self, text_encoder, generator: StreamingGenerator, decoder, latent_hw, device, dtype, weights=None,
                 overlap=False, conditioning: Conditioning | None = None):
        """overlap: decode each chunk on a worker (CUDA side stream on GPU) while the next one is generated.
        conditioning: how pictures and videos to start from are fitted (None: this pipeline takes neither)."""
        self.conditioning = conditioning
        self.weights = weights  # which file (and section) the student weights were read from
        self.text_encoder = text_encoder
        self.generator = generator
        self.decoder = decoder
        self.latent_hw = tuple(latent_hw)
        self.device = torch.device(device)
        self.dtype = dtype
        self.overlap = overlap

    @classmethod
    def from_config(cls, cfg, checkpoint_path=None, use_ema=True, device="cpu") -> "VideoPipeline":
        device = torch.device(device)
        dtype = compute_dtype(cfg.mixed_precision, device)
        if cfg.decoder == "none":
            raise ConfigError("decoder 'none' leaves latents, which make no video: use decoder=vae or decoder=taehv")
        if checkpoint_path is not None and not Path(checkpoint_path).exists():
            raise CheckpointError(f"checkpoint not found: {checkpoint_path}")
        model, weights = load_student(cfg, checkpoint_path, use_ema)
        check_text_len(cfg, model)
        model = model.to(device=device, dtype=dtype)
        latent_hw = latent_size(cfg, model.patch_size)
        generator = compile_if_configured(StreamingGenerator.from_config(model, cfg), cfg, device)
        return cls(load_text_encoder(cfg, device, dtype), generator, load_decoder(cfg, device, dtype), latent_hw,
                   device, dtype, weights, overlap=bool(cfg.overlap_decode), conditioning=Conditioning.from_config(cfg))

    @classmethod
    def from_pretrained(cls, checkpoint_dir, checkpoint_path=None, use_ema=True, config_path=None,
                        device=None) -> "VideoPipeline":
        """Load the student, text encoder and decoder as inference.py does.

        checkpoint_dir: the folder download_checkpoints.sh fills (Wan2.1-T2V-1.3B/, ...); a relative path is
            resolved against the working directory (once, here: later `os.chdir` does not matter).
        checkpoint_path: student weights (a file of any layout inference.py reads); None = the released
            Reward-Forcing-T2V-1.3B/rewardforcing.pt. A relative path is looked up under checkpoint_dir, then
            in the working directory.
        use_ema: the EMA weights where the checkpoint has them (the default, as inference.py's), else its
            weights as they are; `pipe.weights` says which were read. False: never the EMA weights.
        config_path: a YAML file or the name of a preset ("tiny", "reward_forcing"), merged over the packaged
            defaults (None: the packaged defaults, which are the released model's settings).
        device: "cpu", "cuda[:n]" or None (CUDA when available).
        """
        from reward_forcing.config import load_config

        cfg = load_config(config_path)
        folder = _existing_dir(checkpoint_dir)
        cfg.checkpoint_dir = str(folder)
        device = resolve_device("auto" if device is None else str(device))
        return cls.from_config(cfg, _checkpoint_file(folder, checkpoint_path), use_ema, device)

    def __call__(self, prompt: str, num_frames: int = 21, seed: int = 0, image=None, video=None,
                 keep_prefix: bool = False) -> np.ndarray:
        """The whole video: uint8 [1 + 4 * (num_frames - 1), H, W, 3]. num_frames counts latent frames (21 -> 81
        video frames; manifest.jsonl's `latent_frames`), a multiple of num_frame_per_block; seed is the video's
        own seed (manifest.jsonl's `seed`: inference.py makes the same frames for a video with that seed).

        image: a picture to start from (a file path, a PIL image or a uint8 array [H, W, 3]): its centred crop,
            resized to the configured size, is the video's frame 0 (as the VAE reproduces it).
        video: a video to continue (an mp4 path or uint8 frames [T, H, W, 3]): its last whole chunks are encoded
            and the model goes on from them; the result holds the 4 * num_frames new frames only, unless
            keep_prefix, which puts the decoded prefix before them (see reward_forcing/inference/conditioning.py).
        """
        return np.concatenate(list(self.stream(prompt, num_frames, seed, image, video, keep_prefix)))

    def stream(self, prompt: str, num_frames: int = 21, seed: int = 0, image=None, video=None,
               keep_prefix: bool = False) -> Iterator[np.ndarray]:
        """The same frames as `__call__`, yielded as each latent chunk is generated and decoded."""
        chunk = self.generator.chunk_frames
        if num_frames <= 0 or num_frames % chunk:
            raise ConfigError(f"num_frames={num_frames} counts latent frames and must be a positive multiple of "
                              f"the chunk size num_frame_per_block={chunk} (21 latent frames -> 81 video frames)")
        start = self.start_from(image, video, keep_prefix)
        yield from self.frames(self.encode(prompt), num_frames, seed, start=start)

    def encode(self, text: str) -> torch.Tensor:
        return self.text_encoder.encode([text]).to(device=self.device, dtype=self.dtype)

    def start_from(self, image=None, video=None, keep_prefix: bool = False) -> VideoStart | None:
        """The latents a video starts from: a picture's (frame 0), a video's to continue, or None for neither."""
        if image is not None and video is not None:
            raise ConditioningError("give a picture to start from (image) or a video to continue (video), not both")
        if keep_prefix and video is None:
            raise ConditioningError("keep_prefix repeats the video a continuation starts from; no video was given")
        if image is None and video is None:
            return None
        if self.conditioning is None:
            raise ConditioningError("this pipeline was built without conditioning settings; load it with "
                                    "VideoPipeline.from_config or from_pretrained")
        if image is not None:
            return VideoStart(first_frame=self._latents(self.conditioning.read_image(image)[None]))
        return VideoStart(prefix=self._latents(self.conditioning.read_video(video)), keep_prefix=keep_prefix)

    def _latents(self, frames: np.ndarray) -> torch.Tensor:
        return encode_frames(self.decoder, frames, self.device).to(self.dtype)

    def frames(self, context: torch.Tensor, num_frames: int | None, seed: int, switch=None,
               start: VideoStart | None = None, on_latents=None) -> Iterator[np.ndarray]:
        """uint8 frames [n, H, W, 3] of one video, yielded as each latent chunk is generated and decoded.

        switch: see StreamingGenerator.stream (prompt switches); num_frames=None streams until the caller stops.
        start: the latents the video starts from (start_from). A continuation's prefix goes through the decoder
        first, so the new frames go on from its state; those frames are yielded only under keep_prefix.
        on_latents: called with each new latent chunk as it is made, ahead of its frames when decoding overlaps
        (the server keeps them to continue a stopped video)."""
        rng = torch.Generator(device=self.device).manual_seed(seed)
        decoder = self.decoder.stream_decoder()
        start = start or VideoStart()
        first_frame, prefix = (None if latents is None else latents.to(device=self.device, dtype=self.dtype)
                               for latents in (start.first_frame, start.prefix))  # e.g. a server's CPU copy
        chunks = self.generator.stream(context, num_frames, self.latent_hw, generator=rng, dtype=self.dtype,
                                       switch=switch, first_frame=first_frame, prefix=prefix)
        if on_latents is not None:
            chunks = _told(chunks, on_latents)
        prefix = [] if prefix is None else list(prefix.split(self.generator.chunk_frames, dim=2))
        if not start.keep_prefix:
            for chunk in prefix:
                decoder.decode_chunk(chunk)
            prefix = []

        def decode(chunk):
            return to_uint8_frames(decoder.decode_chunk(chunk)[0])

        chunks = chain(prefix, chunks)
        if self.overlap:
            yield from overlapped(chunks, decode, self.device)
        else:
            yield from map(decode, chunks)


def _told(chunks, on_latents):
    """The latent chunks of `chunks`, each first handed to on_latents."""
    for chunk in chunks:
        on_latents(chunk)
        yield chunk
