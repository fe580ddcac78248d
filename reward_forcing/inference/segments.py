"""Multi-prompt videos: a video made of segments, each a prompt held for a number of latent frames.

`inference.py --switch_prompts FILE.jsonl` reads one video per line, a JSON array such as
`[{"prompt": "a cat on grass", "frames": 21}, {"prompt": "the cat jumps", "frames": 12}]`; the
streaming generator switches prompt at each segment's first frame (StreamingGenerator.switch_prompt).
"""
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reward_forcing.video import PromptFileError

SEGMENT_KEYS = ("prompt", "frames")


@dataclass(frozen=True)
class Segment:
    prompt: str
    frames: int  # latent frames, a multiple of the chunk


def parse_segments(value, chunk_frames: int, where: str) -> tuple[Segment, ...]:
    """Check one video's decoded JSON; `where` names it in the one-line error."""
    if not isinstance(value, list) or not value:
        raise PromptFileError(f"{where}: expected a non-empty JSON array of segments")
    segments = []
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict) or set(item) != set(SEGMENT_KEYS):
            raise PromptFileError(f"{where}: segment {number} must be an object with exactly the keys "
                                  f"{', '.join(SEGMENT_KEYS)}")
        prompt, frames = item["prompt"], item["frames"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where}: segment {number} has an empty prompt")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0 or frames % chunk_frames:
            raise PromptFileError(f"{where}: segment {number} has frames={frames!r}; latent frames must be a positive "
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


def total_frames(segments) -> int:
    return sum(segment.frames for segment in segments)


def segment_records(segments) -> list[dict]:
    """Each segment with its first latent frame, for the manifest."""
    records, start = [], 0
    for segment in segments:
        records.append({"prompt": segment.prompt, "frames": segment.frames, "start_frame": start})
        start += segment.frames
    return records


def switch_schedule(segments, encode: Callable) -> Callable:
    """The `switch` argument of StreamingGenerator.stream: each later segment's embeddings at its first frame."""
    return {record["start_frame"]: encode(record["prompt"]) for record in segment_records(segments)[1:]}.get
