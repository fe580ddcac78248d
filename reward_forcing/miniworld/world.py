"""A miniature latent world for measuring the method on CPU: videos are latents [C, F, H, W] directly (no VAE).

One object, a soft Gaussian blob whose channel signature is set by the colour word of the prompt
("a red ball"), over a fixed smooth textured background, moving in a straight line on the torus (it
leaves one edge and comes back at the opposite one, so rollouts of any length stay in the world) with
a random direction and a random speed from static to `max_speed` pixels per latent frame. The speed is
not in the prompt: the data has a spread of motion, as real video data does.

Everything is drawn from `seed`: the colour signatures (orthogonal directions in channel space, each of
norm sqrt(C)), the background, and each sample (keyed by its index). The spec is a JSON file, so the
detector and the reward rebuild the same world from it.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reward_forcing.errors import ConfigError
from reward_forcing.rng import keyed_generator


@dataclass(frozen=True)
class WorldSpec:
    seed: int = 1
    channels: int = 16
    frames: int = 12
    height: int = 8
    width: int = 8
    colours: tuple = ("red", "green", "blue", "yellow", "purple", "pink")
    blob_sigma: float = 1.0          # pixels
    blob_amplitude: float = 1.5      # peak value along the (unit-rms) colour signature
    background_amplitude: float = 0.5
    background_smoothing: float = 1.0  # pixels: Gaussian blur of the background's white noise
    max_speed: float = 0.5           # pixels per latent frame
    start_spread: float = 1.0        # the first position is uniform over this fraction of the frame, centred
    prompt_template: str = "a {} ball"
    # detector: a frame holds one valid blob when its peak response / amplitude lies in `valid_contrast`
    # and what is left after subtracting the detected blob is at most `valid_residual` of the blob's energy
    valid_contrast: tuple = (0.5, 1.5)
    valid_residual: float = 0.5
    extra: dict = field(default_factory=dict)  # free-form notes carried in the JSON (ignored by the code)

    def __post_init__(self):
        if len(self.colours) > self.channels:
            raise ConfigError(f"a world with {self.channels} channels holds at most {self.channels} colours, "
                              f"not {len(self.colours)}")
        if min(self.channels, self.frames, self.height, self.width) < 1 or len(self.colours) < 2:
            raise ConfigError("a world needs positive sizes and at least two colours")


class World:
    def __init__(self, spec: WorldSpec):
        self.spec = spec
        gen = keyed_generator(spec.seed, "miniworld", "signatures")
        basis, _ = torch.linalg.qr(torch.randn(spec.channels, spec.channels, generator=gen, dtype=torch.float64))
        # [K, C], orthogonal rows of norm sqrt(C): a unit-rms pattern over the channels per colour
        self.signatures = (basis[:, :len(spec.colours)].T * math.sqrt(spec.channels)).float()
        self.background = self._background()

    # ---- spec on disk ----
    @classmethod
    def from_file(cls, path) -> "World":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read world spec {path}: {str(err).splitlines()[0]}") from None
        known = WorldSpec.__dataclass_fields__
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"unknown key(s) in world spec {path}: {', '.join(unknown)}")
        for key in ("colours", "valid_contrast"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(WorldSpec(**raw))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self.spec), indent=1) + "\n")

    # ---- drawing ----
    def _background(self) -> torch.Tensor:
        spec = self.spec
        gen = keyed_generator(spec.seed, "miniworld", "background")
        noise = torch.randn(spec.channels, spec.height, spec.width, generator=gen)
        kernel = self.blob(torch.zeros(1, 2), spec.background_smoothing)[0]  # centred at (0, 0) on the torus
        smooth = torch.fft.ifft2(torch.fft.fft2(noise) * torch.fft.fft2(kernel)).real
        smooth = smooth - smooth.mean(dim=(1, 2), keepdim=True)
        return spec.background_amplitude * smooth / smooth.std(dim=(1, 2), keepdim=True)

    def wrap(self, delta: torch.Tensor) -> torch.Tensor:
        """Shortest signed torus difference of (y, x) offsets [..., 2]."""
        return torch.stack([_wrap(delta[..., 0], self.spec.height), _wrap(delta[..., 1], self.spec.width)], -1)

    def blob(self, positions: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """Unit-peak Gaussians [N, H, W] at (y, x) positions [N, 2] on the torus."""
        sigma = self.spec.blob_sigma if sigma is None else sigma
        ys = torch.arange(self.spec.height, dtype=positions.dtype, device=positions.device)
        xs = torch.arange(self.spec.width, dtype=positions.dtype, device=positions.device)
        dy = _wrap(ys[None] - positions[:, :1], self.spec.height)  # [N, H]
        dx = _wrap(xs[None] - positions[:, 1:], self.spec.width)   # [N, W]
        return torch.exp(-(dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / (2 * sigma ** 2))

    def render(self, colour: int, positions: torch.Tensor) -> torch.Tensor:
        """The latent video [C, F, H, W] of blob `colour` at positions [F, 2]."""
        blobs = self.blob(positions)  # [F, H, W]
        signature = self.signatures[colour].view(-1, 1, 1, 1)
        return self.background[:, None] + self.spec.blob_amplitude * signature * blobs[None]

    def prompt(self, colour: int) -> str:
        return self.spec.prompt_template.format(self.spec.colours[colour])

    def colour_of(self, prompt: str) -> int:
        """The colour index named by a prompt of this world (ConfigError for any other prompt)."""
        for index in range(len(self.spec.colours)):
            if prompt == self.prompt(index):
                return index
        raise ConfigError(f"'{prompt}' is not a prompt of this world (e.g. '{self.prompt(0)}')")

    def sample(self, index: int, frames: int | None = None) -> dict:
        """Sample `index` of the world's data: {"latent" [C, F, H, W], "prompt", "colour", "speed", "direction",
        "positions" [F, 2]}, a function of (seed, index) only."""
        spec = self.spec
        frames = spec.frames if frames is None else frames
        gen = keyed_generator(spec.seed, "miniworld", "sample", index)
        colour = int(torch.randint(len(spec.colours), (1,), generator=gen))
        speed, turn, y0, x0 = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        speed *= spec.max_speed
        direction = 2 * math.pi * turn
        step = torch.tensor([math.sin(direction), math.cos(direction)], dtype=torch.float64) * speed
        offset = torch.tensor([y0 - 0.5, x0 - 0.5], dtype=torch.float64) * spec.start_spread
        start = (0.5 + offset) * torch.tensor([spec.height, spec.width], dtype=torch.float64)
        size = torch.tensor([spec.height, spec.width], dtype=torch.float64)
        positions = torch.remainder(start + torch.arange(frames, dtype=torch.float64)[:, None] * step, size).float()
        return {"latent": self.render(colour, positions), "prompt": self.prompt(colour), "colour": colour,
                "speed": speed, "direction": direction, "positions": positions}


def _wrap(delta: torch.Tensor, size: int) -> torch.Tensor:
    """The shortest signed difference on a circle of `size` pixels, in [-size/2, size/2)."""
    return torch.remainder(delta + size / 2, size) - size / 2
