"""The page <-> server websocket protocol: client messages are JSON objects with a `type`.

Client -> server:
    {"type": "start", "prompt": str, "seed": int?, "frames": int?}   frames: latent frames (a multiple of the chunk);
                                                                        absent or null: until stopped
    {"type": "switch", "prompt": str, "at_frame": int?}               at the next chunk boundary, or at latent frame
                                                                        `at_frame` (a later chunk boundary)
    {"type": "pause"} | {"type": "resume"} | {"type": "stop"}
Server -> client: JSON events (hello, queued, started, chunk, switched, paused, resumed, done, error); each chunk
event is followed by its frames, one binary JPEG message each.
"""
import json
from dataclasses import dataclass

MAX_SEED = 2**63 - 1
CONTROLS = ("pause", "resume", "stop")
KEYS = {"start": {"prompt", "seed", "frames"}, "switch": {"prompt", "at_frame"}, **{c: set() for c in CONTROLS}}


class ProtocolError(Exception):
    """A bad client message: the text is sent back as one error event; the server carries on."""


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int
    max_frames: int
    chunk_frames: int


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int | None
    frames: int | None  # None: until stopped


@dataclass(frozen=True)
class Switch:
    prompt: str
    at_frame: int | None


@dataclass(frozen=True)
class Control:
    action: str  # one of CONTROLS


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt(message: dict, limits: Limits) -> str:
    prompt = message.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProtocolError(f"{message['type']}: prompt must be a non-empty string")
    prompt = prompt.strip()
    if len(prompt) > limits.max_prompt_chars:
        raise ProtocolError(f"{message['type']}: prompt has {len(prompt)} characters, more than "
                            f"serve.max_prompt_chars={limits.max_prompt_chars}")
    return prompt


def _chunk_multiple(name: str, value, limits: Limits) -> int:
    if not _whole(value) or value <= 0 or value % limits.chunk_frames:
        raise ProtocolError(f"{name} must be a positive multiple of the chunk ({limits.chunk_frames} latent frames), "
                            f"got {value!r}")
    return value


def parse_message(text, limits: Limits) -> Start | Switch | Control:
    """One client message, checked; anything wrong raises ProtocolError with a one-line reason."""
    if not isinstance(text, str):
        raise ProtocolError("messages must be JSON text, not binary")
    try:
        message = json.loads(text)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"malformed JSON: {err.msg} at character {err.pos}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a message must be a JSON object with a "type"')
    kind = message["type"]
    if kind not in KEYS:
        raise ProtocolError(f"unknown message type {kind[:40]!r}; expected one of {', '.join(KEYS)}")
    unknown = sorted(set(message) - KEYS[kind] - {"type"})
    if unknown:
        raise ProtocolError(f"{kind}: unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}")
    if kind in CONTROLS:
        return Control(kind)
    prompt = _prompt(message, limits)
    if kind == "switch":
        at_frame = message.get("at_frame")
        return Switch(prompt, None if at_frame is None else _chunk_multiple("switch: at_frame", at_frame, limits))
    seed, frames = message.get("seed"), message.get("frames")
    if seed is not None and (not _whole(seed) or not 0 <= seed <= MAX_SEED):
        raise ProtocolError(f"start: seed must be a whole number in [0, 2^63), got {seed!r}")
    if frames is not None:
        _chunk_multiple("start: frames", frames, limits)
        if frames > limits.max_frames:
            raise ProtocolError(f"start: frames={frames} is more than serve.max_frames={limits.max_frames} "
                                "(leave frames out to stream until stopped)")
    return Start(prompt, seed, frames)
