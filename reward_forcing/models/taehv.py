"""TAEHV: a tiny causal video autoencoder for Wan latents (fast preview decoder; madebyollin/taehv, taehv.py).

Every layer works on single frames except three kinds of temporal layer: MemBlock (sees its own input at the
previous frame), TPool (stacks s frames on channels, 1x1 conv) and TGrow (1x1 conv to s*C, split into s frames).
Layouts: the network runs on [N, T, C, H, W]; the public interface is [B, C, T, H, W] like the Wan VAE.
Weights: user-supplied `taew2_1.pth` / `.safetensors`, keys `encoder.{i}.*` / `decoder.{i}.*` (Sequential indices).
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reward_forcing.errors import CheckpointError

def _conv(c_in, c_out, stride=1, bias=True):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(convs(cat[x, past]) + x), with `past` this block's input one frame earlier (zeros at t = 0)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TPool(nn.Module):
    """`stride` consecutive frames stacked on channels (earliest first) -> one frame."""

    def __init__(self, channels, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)


class TGrow(nn.Module):
    """One frame -> `stride` frames: a 1x1 conv to stride*C channels, channel group j becoming frame j."""

    def __init__(self, channels, stride):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)


def _run_parallel(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """All frames at once; x [N, T, C, H, W]."""
    for layer in layers:
        n, t = x.shape[:2]
        if isinstance(layer, MemBlock):
            past = F.pad(x, (0, 0, 0, 0, 0, 0, 1, 0))[:, :t]
            x = layer(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (n, t))
        elif isinstance(layer, TPool):
            s = layer.stride
            x = layer.conv(x.reshape(n * t // s, s * x.shape[2], *x.shape[3:])).unflatten(0, (n, t // s))
        elif isinstance(layer, TGrow):
            y = layer.conv(x.flatten(0, 1))
            x = y.reshape(n, t * layer.stride, y.shape[1] // layer.stride, *y.shape[2:])
        else:
            x = layer(x.flatten(0, 1)).unflatten(0, (n, t))
    return x


class _FrameStream:
    """Pushes frames one at a time through `layers`, keeping MemBlock pasts and partial TPool groups."""

    def __init__(self, layers: nn.Sequential):
        self.layers = layers
        self.state = [None] * len(layers)

    def _step(self, i, layer, frame):
        if isinstance(layer, MemBlock):
            past = self.state[i] if self.state[i] is not None else torch.zeros_like(frame)
            self.state[i] = frame
            return [layer(frame, past)]
        if isinstance(layer, TPool):
            pending = (self.state[i] or []) + [frame]
            self.state[i] = pending if len(pending) < layer.stride else []
            return [layer.conv(torch.cat(pending, dim=1))] if len(pending) == layer.stride else []
        if isinstance(layer, TGrow):
            return list(layer.conv(frame).chunk(layer.stride, dim=1))
        return [layer(frame)]

    def push(self, frames):
        for i, layer in enumerate(self.layers):
            frames = [out for frame in frames for out in self._step(i, layer, frame)]
        return frames


class TAEHV(nn.Module):
    """Defaults are taew2_1's sizes; `from_file` reads the sizes off the checkpoint's tensor shapes."""

    def __init__(self, latent_channels=16, image_channels=3, encoder_width=64, decoder_widths=(256, 128, 64, 64),
                 encoder_time_strides=(2, 2, 1), decoder_time_strides=(1, 2, 2)):
        super().__init__()
        w = encoder_width
        enc = [_conv(image_channels, w), nn.ReLU()]
        for stride in encoder_time_strides:
            enc += [TPool(w, stride), _conv(w, w, stride=2, bias=False), MemBlock(w), MemBlock(w), MemBlock(w)]
        enc.append(_conv(w, latent_channels))
        self.encoder = nn.Sequential(*enc)

        dw = list(decoder_widths)
        dec = [Clamp(), _conv(latent_channels, dw[0]), nn.ReLU(), MemBlock(dw[0]), MemBlock(dw[0]), MemBlock(dw[0])]
        for i, stride in enumerate(decoder_time_strides):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), TGrow(dw[i], stride),
                    _conv(dw[i], dw[i + 1], bias=False)]
            last = i == len(decoder_time_strides) - 1
            dec += [nn.ReLU()] if last else [MemBlock(dw[i + 1]), MemBlock(dw[i + 1]), MemBlock(dw[i + 1])]
        dec.append(_conv(dw[-1], image_channels))
        self.decoder = nn.Sequential(*dec)
        self.time_compression = math.prod(encoder_time_strides)
        # TGrow turns latent 0 into prod(strides) frames; only the last one is real (Wan's first frame).
        self.frames_to_trim = math.prod(decoder_time_strides) - 1

    @classmethod
    def from_state_dict(cls, sd: dict, source="state dict"):
        try:
            convs = [sd[f"decoder.{i}.weight"] for i in _plain_conv_indices(sd, "decoder")]
            model = cls(latent_channels=convs[0].shape[1], image_channels=convs[-1].shape[0],
                        encoder_width=sd["encoder.0.weight"].shape[0],
                        decoder_widths=tuple(c.shape[0] for c in convs[:-1]))
        except (KeyError, IndexError):
            raise CheckpointError(f"{source} is not a TAEHV checkpoint (encoder.{{i}}/decoder.{{i}} keys)") from None
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{source} does not match TAEHV: missing {missing[:3]}, unexpected {unexpected[:3]}")
        sd = dict(sd)
        for name, module in model.named_modules():
            key = f"{name}.conv.weight"
            if isinstance(module, TGrow) and sd[key].shape[0] > expected[key].shape[0]:
                sd[key] = sd[key][-expected[key].shape[0]:]  # wider TGrow in a checkpoint: its last rows are used
        bad = [k for k in sd if sd[k].shape != expected[k].shape]
        if bad:
            raise CheckpointError(f"{source}: '{bad[0]}' has shape {tuple(sd[bad[0]].shape)}, "
                                  f"expected {tuple(expected[bad[0]].shape)}")
        model.load_state_dict(sd, strict=True)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path, device="cpu", dtype=torch.float32):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"TAEHV weights not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                sd = load_file(str(path))
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or foreign files raise a variety of errors
            raise CheckpointError(f"cannot read TAEHV weights {path}: {str(err).splitlines()[0]}") from None
        return cls.from_state_dict(sd, source=str(path)).to(device=device, dtype=dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, pad_front: bool = False) -> torch.Tensor:
        """pixels [B,3,T,H,W] in [-1,1] -> latents [B,C,F,h,w]; T end-padded by repeating the last frame (as
        upstream's encode_video). pad_front: padded at the start with copies of the first frame instead, the
        inverse of `decode`'s trim, so a video of 1 + 4k frames gives 1 + k latents aligned as the Wan VAE's:
        latent 0 is the first frame (repeated), latent j frames 4j-3..4j."""
        x = ((pixels + 1) / 2).transpose(1, 2)
        pad = -x.shape[1] % self.time_compression
        if pad:
            edge = x[:, :1] if pad_front else x[:, -1:]
            padding = edge.expand(-1, pad, -1, -1, -1)
            x = torch.cat([padding, x] if pad_front else [x, padding], dim=1)
        return _run_parallel(self.encoder, x).transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,C,F,h,w] -> pixels [B,3,1+4(F-1),H,W] in [-1,1]."""
        x = _run_parallel(self.decoder, latents.transpose(1, 2)).clamp(0, 1)
        return (x[:, self.frames_to_trim:] * 2 - 1).transpose(1, 2)

    def stream_decoder(self) -> "StreamingTAEHVDecoder":
        return StreamingTAEHVDecoder(self)


def _plain_conv_indices(sd: dict, side: str) -> list[int]:
    """Sequential indices of the 3x3 convs on one side (MemBlock/TPool/TGrow convs are nested deeper)."""
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith(side + ".") and k.count(".") == 2
                  and k.endswith(".weight") and sd[k].ndim == 4 and sd[k].shape[-1] == 3})
    return idx


class StreamingTAEHVDecoder:
    """Chunk-by-chunk decode of one video: 1 frame for the first latent, then 4 per latent, equal to `decode`."""

    def __init__(self, taehv: TAEHV):
        self.stream = _FrameStream(taehv.decoder)
        self.to_skip = taehv.frames_to_trim

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        frames = self.stream.push(list(latents.unbind(dim=2)))
        skip = min(self.to_skip, len(frames))
        self.to_skip -= skip
        frames = frames[skip:]
        if not frames:
            raise ValueError("decode_chunk needs at least one latent frame")
        return torch.stack(frames, dim=2).clamp(0, 1) * 2 - 1
