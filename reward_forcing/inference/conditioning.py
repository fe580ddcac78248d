"""Image-to-video and video continuation: a picture or a video (a file, a PIL image, a uint8 array) fitted to the
configured size and encoded into the clean latents a StreamingGenerator starts from.

Fitting, the same at every entry point (inference.py, VideoPipeline, the server): the largest centred region with
the configured aspect ratio is cropped, then resized (bicubic) to height x width, so pixels outside that region
never reach the model. A picture (or video frame) of more than `conditioning.max_pixels` pixels, or one whose
crop would be enlarged more than `conditioning.max_upscale` times, is refused.

Encoding: Wan's VAE encodes a video's first frame on its own as latent frame 0 and each next 4 frames as one
latent (Wan2.1 wan/modules/vae.py), so a picture is latent frame 0 and a video of 1 + 4k frames is 1 + k latents.
The autoencoder is the pipeline's decoder: the Wan VAE, or TAEHV's own encoder with `decoder: taehv` (its
checkpoint always holds one: TAEHV.from_state_dict refuses a file without the encoder's weights).

A video to continue is resampled to `fps` (at each 1/fps instant, the frame on screen then: a faster video loses
frames, a slower one repeats them; frames given as an array are taken to be at `fps` already), and its last
1 + 4(n - 1) frames are kept, n the largest multiple of the chunk (num_frame_per_block) that fits, so the
continuation starts where the video ends.
"""
import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from reward_forcing.errors import UserError
from reward_forcing.inference.generator import pixel_frames, vae_strides
from reward_forcing.video import ConditionFile


class ConditioningError(UserError):
    """A picture or video to start from that is missing, unreadable, too large, too small or too short."""


@dataclass(frozen=True)
class VideoStart:
    """Clean latents a video starts from: `first_frame` [1, C, 1, h, w] (image-to-video) or `prefix`
    [1, C, P, h, w], P a multiple of the chunk (continuation; keep_prefix: the output repeats it, decoded)."""
    first_frame: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    keep_prefix: bool = False


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Conditioning:
    """How pictures and videos are read and fitted for one configuration."""
    height: int
    width: int
    max_pixels: int
    max_upscale: float
    fps: int
    chunk_frames: int      # latent frames per chunk
    temporal_stride: int   # video frames per latent frame after the first

    @classmethod
    def from_config(cls, cfg) -> "Conditioning":
        return cls(int(cfg.height), int(cfg.width), int(cfg.conditioning.max_pixels),
                   float(cfg.conditioning.max_upscale), int(cfg.fps), int(cfg.num_frame_per_block),
                   vae_strides(cfg)[0])

    # -- pictures ---------------------------------------------------------------------------------------------
    def check_pixels(self, size: tuple[int, int], name: str) -> None:
        """Refuse a picture of `size` (width, height) that is too large, or too small for the configured size."""
        width, height = size
        if width * height > self.max_pixels:
            raise ConditioningError(f"{name} is {width}x{height} = {width * height} pixels, more than "
                                    f"conditioning.max_pixels={self.max_pixels}")
        box = self.crop_box(width, height)
        upscale = self.width / (box[2] - box[0])
        if upscale > self.max_upscale:
            raise ConditioningError(f"{name} is too small: {width}x{height}, its centred crop would be enlarged "
                                    f"{upscale:.1f}x to {self.width}x{self.height}, more than "
                                    f"conditioning.max_upscale={self.max_upscale:g}")

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the largest centred region of a width x height picture with the
        configured aspect ratio."""
        if width * self.height > height * self.width:  # wider than the target: crop the sides
            crop_w, crop_h = max(1, round(height * self.width / self.height)), height
        else:
            crop_w, crop_h = width, max(1, round(width * self.height / self.width))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return left, top, left + crop_w, top + crop_h

    def fit(self, image: Image.Image, name: str) -> np.ndarray:
        """uint8 [height, width, 3]: the centred crop of `image`, resized."""
        self.check_pixels(image.size, name)
        crop = image.convert("RGB").crop(self.crop_box(*image.size))
        return np.asarray(crop.resize((self.width, self.height), Image.Resampling.BICUBIC))

    def read_image(self, source, formats: tuple[str, ...] | None = None) -> np.ndarray:
        """uint8 [height, width, 3] from a file path, a PIL image, a uint8 array [H, W, 3] or an encoded file's
        bytes (an upload); formats: the file formats taken (PIL's names, any case; None: any PIL reads)."""
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise ConditioningError(f"image not found: {path}")
            return self.fit(_open_image(path, str(path), self, formats), str(source))
        if isinstance(source, (bytes, bytearray)):
            return self.fit(_open_image(io.BytesIO(source), "the picture", self, formats), "the picture")
        if isinstance(source, Image.Image):
            return self.fit(source, "the image")
        return self.fit(Image.fromarray(_uint8_frames(source, "image", 3)), "the image")

    # -- videos -----------------------------------------------------------------------------------------------
    def read_video(self, source) -> np.ndarray:
        """uint8 [T, height, width, 3], T = 1 + stride * (n - 1) for n latent frames, a multiple of the chunk: the
        end of a video file (resampled to fps) or of a uint8 array [T, H, W, 3] (taken to be at fps)."""
        if isinstance(source, (str, os.PathLike)):
            name = str(source)
            frames = _read_video_file(Path(source), self)
        else:
            name = "the video"
            array = _uint8_frames(source, "video", 4)
            frames = [self.fit(Image.fromarray(frame), f"the video's frame {i}") for i, frame in enumerate(array)]
        return np.stack(frames[-self._kept_frames(len(frames), name):])

    def _kept_frames(self, count: int, name: str) -> int:
        latents = 1 + (count - 1) // self.temporal_stride if count else 0
        whole = latents // self.chunk_frames * self.chunk_frames
        if whole == 0:
            shortest = 1 + self.temporal_stride * (self.chunk_frames - 1)
            raise ConditioningError(f"{name} is shorter than one chunk: {count} frames at {self.fps} fps; "
                                    f"continuing needs at least {shortest} (num_frame_per_block="
                                    f"{self.chunk_frames} latent frames)")
        return 1 + self.temporal_stride * (whole - 1)

    def prefix_latent_frames(self, video_frames: int) -> int:
        """Latent frames of a prefix of `video_frames` kept frames (read_video's output)."""
        return 1 + (video_frames - 1) // self.temporal_stride


def _uint8_frames(array, what: str, ndim: int) -> np.ndarray:
    shape = "[H, W, 3]" if ndim == 3 else "[T, H, W, 3]"
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != ndim or array.shape[-1] != 3:
        described = f"{array.dtype} array {list(array.shape)}" if isinstance(array, np.ndarray) else \
            type(array).__name__
        paths = "a file path, a PIL image" if ndim == 3 else "a file path"
        raise ConditioningError(f"{what} must be {paths} or a uint8 array {shape}, got {described}")
    return array


def _open_image(file, name: str, conditioning: Conditioning, formats=None) -> Image.Image:
    """The decoded picture in `file` (a path or a binary file; EXIF orientation applied); its format and size are
    checked before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit here
            with Image.open(file) as image:
                if formats is not None and image.format.lower() not in {f.lower() for f in formats}:
                    raise ConditioningError(f"{name} is {image.format}; the formats taken are {', '.join(formats)}")
                conditioning.check_pixels(image.size, name)
                image.load()
                return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise ConditioningError(f"{name} has more pixels than PIL will decode "
                                f"(conditioning.max_pixels={conditioning.max_pixels})") from None
    except UnidentifiedImageError:
        raise ConditioningError(f"{name} is not an image (PIL cannot read its format)") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise ConditioningError(f"cannot read image {name}: {str(err).splitlines()[0]}") from None


def _read_video_file(path: Path, conditioning: Conditioning) -> list[np.ndarray]:
    """Every frame of the video at `path`, fitted, at `conditioning.fps` (the frame on screen at each instant)."""
    import imageio.v3 as iio

    if not path.is_file():
        raise ConditioningError(f"video not found: {path}")
    try:
        source_fps = float(iio.immeta(path, plugin="FFMPEG")["fps"])
        if not 0 < source_fps < float("inf"):
            raise ValueError(f"its frame rate is {source_fps}")
        step = source_fps / conditioning.fps  # source frames per output frame
        frames = []
        for index, frame in enumerate(iio.imiter(path, plugin="FFMPEG")):
            fitted = None
            while math.floor(len(frames) * step + 1e-9) == index:  # the frame on screen at the next instant
                fitted = conditioning.fit(Image.fromarray(frame), str(path)) if fitted is None else fitted
                frames.append(fitted)
    except ConditioningError:
        raise
    except Exception as err:  # ffmpeg's errors on foreign or truncated files come as several types
        message = str(err).strip().splitlines()
        raise ConditioningError(f"cannot read video {path}: {message[0] if message else type(err).__name__}") \
            from None
    return frames


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> pixels [1, 3, T, H, W] in [-1, 1] (the inverse of video.to_uint8_frames)."""
    return (torch.tensor(frames).permute(3, 0, 1, 2)[None].float() / 127.5) - 1.0


@torch.no_grad()
def encode_frames(autoencoder, frames: np.ndarray, device) -> torch.Tensor:
    """Latents [1, C, 1 + (T - 1) / 4, h, w] of uint8 frames [T, H, W, 3] (T = 1 + 4k), aligned as Wan's VAE
    aligns them (module docstring), by the Wan VAE or TAEHV."""
    from reward_forcing.models.taehv import TAEHV

    parameter = next(autoencoder.parameters())
    pixels = to_pixels(frames).to(device=device, dtype=parameter.dtype)
    if isinstance(autoencoder, TAEHV):
        return autoencoder.encode(pixels, pad_front=True)
    return autoencoder.encode(pixels)


@dataclass(frozen=True)
class CheckedCondition:
    """A picture or video file read through once (decodable, within the limits, long enough), with its digest."""
    file: ConditionFile
    sha256: str
    prefix_latent_frames: int = 0  # a video's: the latent frames it continues from

    def record(self, keep_prefix: bool) -> dict:
        """What manifest.jsonl keeps of it; all but "file" must match for a finished video to be skipped."""
        record = {"kind": self.file.kind, "file": str(self.file.path), "sha256": self.sha256}
        if self.file.kind == "video":
            record.update(prefix_latent_frames=self.prefix_latent_frames, keep_prefix=bool(keep_prefix))
        return record

    def start_arguments(self, keep_prefix: bool) -> dict:
        """VideoPipeline.start_from's arguments for this file."""
        if self.file.kind == "image":
            return {"image": self.file.path}
        return {"video": self.file.path, "keep_prefix": keep_prefix}

    def pixel_frames(self, cfg, latent_frames: int, keep_prefix: bool) -> int:
        """Video frames written for `latent_frames` new latents: a continuation's each decode to `stride` frames
        (the decoder goes on from the prefix), and keep_prefix puts the decoded prefix before them."""
        if self.file.kind == "image":
            return pixel_frames(cfg, latent_frames)
        prefix = pixel_frames(cfg, self.prefix_latent_frames)
        return pixel_frames(cfg, self.prefix_latent_frames + latent_frames) - (0 if keep_prefix else prefix)


def check_condition(conditioning: Conditioning, file: ConditionFile) -> CheckedCondition:
    """Read `file` through as generation will (errors name where it was given), and hash it."""
    try:
        if file.kind == "image":
            conditioning.read_image(file.path)
            return CheckedCondition(file, file_sha256(file.path))
        frames = len(conditioning.read_video(file.path))
    except ConditioningError as err:
        raise ConditioningError(f"{file.origin}: {err}" if file.origin else str(err)) from None
    return CheckedCondition(file, file_sha256(file.path), conditioning.prefix_latent_frames(frames))
