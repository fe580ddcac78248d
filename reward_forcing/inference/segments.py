"""Multi-prompt videos: a video made of segments, each a prompt held for a number of latent frames.

`inference.py --switch_prompts FILE.jsonl` reads one video per line, a JSON array such as
`[{"prompt": "a cat on grass", "latent_frames": 21}, {"prompt": "the cat jumps", "latent_frames": 12}]`
(`frames` is accepted for `latent_frames`, as files written before the key named its unit); the
streaming generator switches prompt at each segment's first frame (StreamingGenerator.switch_prompt).
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reward_forcing.video import PromptFileError

SEGMENT_KEYS = ("prompt", "latent_frames")
OLD_FRAMES_KEY = "frames"  # the earlier name of latent_frames, in switch files and manifests


@dataclass(frozen=True)
class Segment:
    prompt: str
    latent_frames: int  # a multiple of the chunk


def parse_segments(value, chunk_frames: int, where: str) -> tuple[Segment, ...]:
    """Check one video's decoded JSON; `where` names it in the one-line error."""
    if not isinstance(value, list) or not value:
        raise PromptFileError(f"{where}: expected a non-empty JSON array of segments")
    segments = []
    for number, item in enumerate(value, start=1):
        item = _renamed(item) if isinstance(item, dict) else item
        if not isinstance(item, dict) or set(item) != set(SEGMENT_KEYS):
            raise PromptFileError(f"{where}: segment {number} must be an object with exactly the keys "
                                  f"{', '.join(SEGMENT_KEYS)}")
        prompt, frames = item["prompt"], item["latent_frames"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where}: segment {number} has an empty prompt")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0 or frames % chunk_frames:
            raise PromptFileError(f"{where}: segment {number} has latent_frames={frames!r}; it must be a positive "
                                  f"multiple of the chunk size num_frame_per_block={chunk_frames}")
        segments.append(Segment(prompt.strip(), frames))
    return tuple(segments)


def read_switch_prompts(path, chunk_frames: int) -> list[tuple[Segment, ...]]:
    """The videos of a segments file, blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"switch prompts file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PromptFileError(f"cannot read switch prompts file {path}: {err}") from None
    videos = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path} line {number}: not JSON ({err.msg})") from None
        videos.append(parse_segments(value, chunk_frames, f"{path} line {number}"))
    if not videos:
        raise PromptFileError(f"switch prompts file {path} contains no videos")
    return videos


def _renamed(item: dict) -> dict:
    """A segment written with the older key `frames` spelled as `latent_frames` (other items unchanged)."""
    if OLD_FRAMES_KEY in item and "latent_frames" not in item:
        item = {("latent_frames" if key == OLD_FRAMES_KEY else key): value for key, value in item.items()}
    return item


def total_frames(segments) -> int:
    """Latent frames of a multi-prompt video."""
    return sum(segment.latent_frames for segment in segments)


def segment_records(segments) -> list[dict]:
    """Each segment with its first latent frame, for the manifest."""
    records, start = [], 0
    for segment in segments:
        records.append({"prompt": segment.prompt, "latent_frames": segment.latent_frames, "start_latent_frame": start})
        start += segment.latent_frames
    return records


def recorded_segments(records: list[dict]) -> list[dict]:
    """A manifest's segment list in today's keys; manifests written before the keys named their unit said
    `frames` and `start_frame`."""
    return [{"prompt": record.get("prompt"), "latent_frames": record.get("latent_frames", record.get("frames")),
             "start_latent_frame": record.get("start_latent_frame", record.get("start_frame"))}
            for record in records]


def switch_schedule(segments, encode: Callable) -> Callable:
    """The `switch` argument of StreamingGenerator.stream: each later segment's embeddings at its first frame."""
    return {record["start_latent_frame"]: encode(record["prompt"]) for record in segment_records(segments)[1:]}.get
