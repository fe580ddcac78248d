"""The page <-> server websocket protocol: client messages are JSON objects with a `type`.

Counts name their unit: a latent frame is one frame of the DiT's latent video, and latent frames
[0, n) decode to 1 + 4 (n - 1) video frames (the Wan VAE's 4x temporal stride, arXiv 2503.20314 §3.1).

Client -> server:
    {"type": "start", "prompt": str, "seed": int | str?, "frames": int?, "picture": str?, "continue": bool?}
        seed: a whole number in [0, 2^63), as a JSON integer or a string of digits (JavaScript numbers round
        above 2^53, so the page sends a string); absent or null: the server picks one.
        frames: latent frames, a multiple of the chunk; absent or null: until stopped.
        picture: the token POST /picture returned for an uploaded picture: the video starts from it (frame 0).
        continue: true: the video goes on from this connection's last one (after Stop or its end), whose latent
            frames the model replays; `frames` counts the new ones, and the mp4 holds the whole video.
    {"type": "switch", "prompt": str, "at_frame": int?}
        at the next chunk boundary, or at latent frame `at_frame` (a later chunk boundary)
    {"type": "pause"} | {"type": "resume"} | {"type": "stop"}
Server -> client: JSON events; each chunk event is followed by its video frames, one binary JPEG message each.
    hello     chunk_latent_frames, max_latent_frames, fps, height, width, max_prompt_chars, decoder, ...
    queued    position (1 = next), busy
    started   seed (a string: exact in every JSON reader), latent_frames (null: until stopped), wait_s,
              continues_from? (the latent frames of the video it continues), picture? (true: starts from one)
    chunk     start_latent_frame, video_frames (JPEG messages that follow), generate_s, ttff_s?, switch_s?
    switched  start_latent_frame, prompt
    paused | resumed   latent_frame: the chunk boundary where the video goes on
    dropped   video_frames: frames not sent since the last event, the client reads slower than the stream
              (the downloadable mp4 holds every frame)
    done      reason, video_frames (sent by this stream), latent_frames (of the whole video), seconds, video (the
              mp4's address), continuable (a start with "continue" may go on from it)
HTTP: POST /picture, body the picture file (serve.max_image_bytes, serve.image_types) -> {"picture": token,
    "width", "height", "preview": the fitted picture's PNG address}, or {"error": one line} with 400 / 413.
    error     message; ends_stream: true when the stream is over (otherwise the connection carries on)
"""
import json
import re
from dataclasses import dataclass

from reward_forcing.serve.videos import TOKEN

MAX_SEED = 2**63 - 1
SEED_DIGITS = re.compile(r"[0-9]{1,19}")
CONTROLS = ("pause", "resume", "stop")
KEYS = {"start": {"prompt", "seed", "frames", "picture", "continue"}, "switch": {"prompt", "at_frame"},
        **{c: set() for c in CONTROLS}}
# A message is refused unread when longer than its prompt could make it: one character's longest JSON spelling
# is 12 characters (a surrogate pair's escapes, \ud83d\ude00), plus room for the other fields and whitespace.
JSON_CHARS_PER_CHAR = 12
MESSAGE_ROOM_CHARS = 1024
SHOWN_CHARS = 40  # the most of a client's value an error message repeats


def max_message_chars(max_prompt_chars: int) -> int:
    return JSON_CHARS_PER_CHAR * max_prompt_chars + MESSAGE_ROOM_CHARS


class ProtocolError(Exception):
    """A bad client message: the text is sent back as one error event; the server carries on."""


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int
    max_frames: int  # latent frames
    chunk_frames: int  # latent frames

    @property
    def max_message_chars(self) -> int:
        return max_message_chars(self.max_prompt_chars)


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int | None
    frames: int | None  # latent frames; None: until stopped
    picture: str | None = None  # an uploaded picture's token
    continues: bool = False  # goes on from the connection's last video


@dataclass(frozen=True)
class Switch:
    prompt: str
    at_frame: int | None  # latent frame


@dataclass(frozen=True)
class Control:
    action: str  # one of CONTROLS


def shown(value) -> str:
    """A client's JSON value as an error message repeats it: its repr cut to SHOWN_CHARS characters; an array
    or object by its kind only (its repr could be as long, and as deeply nested, as the message)."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lone_surrogate(text: str) -> int | None:
    """Where `text` holds half a UTF-16 surrogate pair (valid JSON, but no UTF-8 text), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _prompt(message: dict, limits: Limits) -> str:
    prompt = message.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProtocolError(f"{message['type']}: prompt must be a non-empty string")
    prompt = prompt.strip()
    if len(prompt) > limits.max_prompt_chars:
        raise ProtocolError(f"{message['type']}: prompt has {len(prompt)} characters, more than "
                            f"serve.max_prompt_chars={limits.max_prompt_chars}")
    where = _lone_surrogate(prompt)
    if where is not None:
        raise ProtocolError(f"{message['type']}: prompt holds a lone UTF-16 surrogate {prompt[where]!r} at "
                            f"character {where}, which is not text (send the whole pair)")
    return prompt


def _chunk_multiple(name: str, value, limits: Limits) -> int:
    if not _whole(value) or value <= 0 or value % limits.chunk_frames:
        raise ProtocolError(f"{name} must be a positive multiple of the chunk ({limits.chunk_frames} latent frames), "
                            f"got {shown(value)}")
    return value


def _seed(value) -> int | None:
    if value is None:
        return None
    seed = int(value) if isinstance(value, str) and SEED_DIGITS.fullmatch(value) else value
    if not _whole(seed) or not 0 <= seed <= MAX_SEED:
        raise ProtocolError("start: seed must be a whole number in [0, 2^63), as a JSON integer or a string of "
                            f"digits, got {shown(value)}")
    return seed


def _json(text: str, limits: Limits):
    if len(text) > limits.max_message_chars:
        raise ProtocolError(f"the message has {len(text)} characters, more than the {limits.max_message_chars} "
                            f"a message may have (serve.max_prompt_chars={limits.max_prompt_chars})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"malformed JSON: {err.msg} at character {err.pos}") from None
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    except ValueError:  # an integer longer than Python converts (sys.int_info.default_max_str_digits)
        raise ProtocolError("malformed JSON: a number with too many digits") from None


def parse_message(text, limits: Limits) -> Start | Switch | Control:
    """One client message, checked; anything wrong raises ProtocolError with a one-line reason."""
    if not isinstance(text, str):
        raise ProtocolError("messages must be JSON text, not binary")
    message = _json(text, limits)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError('a message must be a JSON object with a "type"')
    kind = message["type"]
    if kind not in KEYS:
        raise ProtocolError(f"unknown message type {shown(kind)}; expected one of {', '.join(KEYS)}")
    unknown = sorted(set(message) - KEYS[kind] - {"type"})
    if unknown:
        raise ProtocolError(f"{kind}: unknown field(s) {', '.join(shown(k) for k in unknown[:5])}")
    if kind in CONTROLS:
        return Control(kind)
    prompt = _prompt(message, limits)
    if kind == "switch":
        at_frame = message.get("at_frame")
        return Switch(prompt, None if at_frame is None else _chunk_multiple("switch: at_frame", at_frame, limits))
    seed, frames = _seed(message.get("seed")), message.get("frames")
    if frames is not None:
        _chunk_multiple("start: frames", frames, limits)
        if frames > limits.max_frames:
            raise ProtocolError(f"start: frames={shown(frames)} latent frames is more than serve.max_frames="
                                f"{limits.max_frames} (leave frames out to stream until stopped)")
    picture, continues = message.get("picture"), message.get("continue", False)
    if picture is not None and not (isinstance(picture, str) and TOKEN.fullmatch(picture)):
        raise ProtocolError(f"start: picture must be the token POST /picture returned, got {shown(picture)}")
    if not isinstance(continues, bool):
        raise ProtocolError(f"start: continue must be true or false, got {shown(continues)}")
    if picture is not None and continues:
        raise ProtocolError("start: a video starts from a picture or continues the last one, not both")
    return Start(prompt, seed, frames, picture, continues)
