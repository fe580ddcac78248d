"""Videos on disk: prompt files, file names VBench can find, the manifest, and an mp4 writer.

VBench locates a prompt's videos by the exact name `{prompt}-{i}.mp4`, so names are the prompt
itself whenever the file system allows it; only impossible names get an escaped, hashed variant.

A prompt file is text, one prompt per line, or JSONL (a `.jsonl` name): one object per line with a "prompt" and
at most one of "image" (a picture the video starts from) and "video" (a video it continues), paths relative to
the JSONL file's folder.
"""
import hashlib
import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import imageio
import numpy as np
import torch

from reward_forcing.errors import UserError

# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp unless this is set. preexec_fn runs Python in the
# forked child, which can deadlock when other threads hold locks at fork time: the server writes its mp4 from
# a worker thread beside the decode thread and the event loop, and a writer hung there forever
# (imageio-ffmpeg's own _utils.py names this switch as the work-around for a hang on fork()).
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

NAME_MAX_BYTES = 255  # POSIX NAME_MAX on ext4/xfs/btrfs/tmpfs
HASH_CHARS = 10


class PromptFileError(UserError):
    """A prompt file that is missing, empty, undecodable, or does not line up with its extended file."""


CONDITION_KINDS = ("image", "video")  # a picture to start from, a video to continue
JSONL_KEYS = ("prompt", *CONDITION_KINDS)


@dataclass(frozen=True)
class ConditionFile:
    """A picture to start from (kind "image") or a video to continue (kind "video")."""
    kind: str
    path: Path
    origin: str = field(default="", compare=False)  # where it was named, for messages: "prompts.jsonl line 3"


@dataclass(frozen=True)
class Prompt:
    index: int  # position among the non-blank prompts of the file
    text: str  # the short prompt: names the video
    extended: str | None = None  # the text actually generated when an extended file is given
    condition: ConditionFile | None = None  # a JSONL line's "image" or "video"

    @property
    def generation_text(self) -> str:
        return self.text if self.extended is None else self.extended


def _read_lines(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PromptFileError(f"cannot read prompt file {path}: {err}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def read_prompts(data_path, extended_path=None) -> tuple[list[Prompt], int]:
    """Prompts of `data_path` (blank lines skipped), paired line by line with `extended_path`.

    Returns the prompts and the number of blank lines skipped.
    """
    short = _read_lines(data_path)
    extended = _read_lines(extended_path) if extended_path is not None else None
    if extended is not None:
        if len(extended) != len(short):
            raise PromptFileError(
                f"extended prompt file {extended_path} has {len(extended)} lines but {data_path} has {len(short)}"
            )
        for number, (a, b) in enumerate(zip(short, extended), start=1):
            if bool(a) != bool(b):
                raise PromptFileError(
                    f"extended prompt file {extended_path} does not line up with {data_path}: "
                    f"line {number} is blank in only one of them"
                )
    jsonl = Path(data_path).suffix == ".jsonl"
    prompts = []
    for number, line in enumerate(short):
        if line:
            text, condition = _jsonl_line(line, Path(data_path), number + 1) if jsonl else (line, None)
            prompts.append(Prompt(len(prompts), text, extended[number] if extended is not None else None, condition))
    if not prompts:
        raise PromptFileError(f"prompt file {data_path} contains no prompts")
    return prompts, len(short) - len(prompts)


def _jsonl_line(line: str, path: Path, number: int) -> tuple[str, ConditionFile | None]:
    """(prompt, condition) of one JSONL line; a named file must exist (checked before anything is generated)."""
    where = f"{path} line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(item, dict) or "prompt" not in item or not set(item) <= set(JSONL_KEYS):
        raise PromptFileError(f"{where}: expected an object with a \"prompt\" and at most one of \"image\", "
                              "\"video\"")
    kinds = [kind for kind in CONDITION_KINDS if kind in item]
    if len(kinds) > 1:
        raise PromptFileError(f"{where}: a video starts from an image or continues a video, not both")
    values = [item["prompt"]] + [item[kind] for kind in kinds]
    if not all(isinstance(value, str) and value.strip() for value in values):
        raise PromptFileError(f"{where}: \"prompt\"{' and ' + repr(kinds[0]) if kinds else ''} must be non-empty "
                              "strings")
    if not kinds:
        return item["prompt"].strip(), None
    file = path.parent / Path(item[kinds[0]]).expanduser()
    if not file.is_file():
        raise PromptFileError(f"{where}: {kinds[0]} not found: {file}")
    return item["prompt"].strip(), ConditionFile(kinds[0], file, where)


def _fits(stem: str, suffix: str) -> bool:
    return len((stem + suffix).encode("utf-8")) <= NAME_MAX_BYTES


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")


def _cap_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def video_stem(prompt: str, max_sample_index: int = 0) -> str:
    """The file-name stem for `prompt`: the prompt itself when `{prompt}-{i}.mp4` is a valid name.

    Otherwise `/`, NUL and `%` are percent-escaped, the result is cut to fit 255 bytes, and `~` plus a
    hash of the full prompt is appended, so two long prompts sharing a prefix never share a name.
    """
    suffix = f"-{max_sample_index}.mp4"
    if "/" not in prompt and "\0" not in prompt and _fits(prompt, suffix):
        return prompt
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:HASH_CHARS]
    tail = f"~{digest}"
    room = NAME_MAX_BYTES - len((tail + suffix).encode("utf-8"))
    return _cap_utf8(_escape(prompt), room) + tail


def video_name(stem: str, sample_index: int) -> str:
    return f"{stem}-{sample_index}.mp4"


def unique_by_stem(prompts: list[Prompt], stem_of) -> list[Prompt]:
    """Drop prompts whose video stem repeats an earlier one (VBench's list has two), with a warning; two that
    would share a name but start from different files are refused."""
    seen = {}
    kept = []
    for prompt in prompts:
        stem = stem_of(prompt)
        if stem in seen:
            first = seen[stem]
            if first.condition != prompt.condition:
                raise PromptFileError(f"prompts {first.index} and {prompt.index} would both be named {stem!r} but "
                                      "start from different files; use --save_with_index")
            warnings.warn(
                f"prompt {prompt.index} repeats prompt {first.index} ({prompt.text[:60]!r}); generated once",
                stacklevel=2,
            )
            continue
        seen[stem] = prompt
        kept.append(prompt)
    return kept


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[3, n, H, W] pixels in [-1, 1] -> [n, H, W, 3] uint8 (rounded, not truncated)."""
    frames = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


PARTIAL_PREFIX = ".partial-"
DIGEST_CHARS = 16


def _partial_name(final_name: str) -> str:
    """`.partial-<name hash>-<host>-<pid>.mp4`: the writer's host and pid tell whether it is still alive."""
    digest = hashlib.sha256(final_name.encode("utf-8")).hexdigest()[:DIGEST_CHARS]
    return f"{PARTIAL_PREFIX}{digest}-{socket.gethostname()}-{os.getpid()}.mp4"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_partials(folder) -> list[Path]:
    """Delete the partial videos left in `folder` by killed writers on this host (their pid is gone).

    Partials of live processes and of other hosts (a shared file system) are kept. Returns what was removed.
    """
    folder = Path(folder)
    removed = []
    host = socket.gethostname()
    for path in folder.glob(f"{PARTIAL_PREFIX}*.mp4") if folder.is_dir() else []:
        owner = path.name[len(PARTIAL_PREFIX) + DIGEST_CHARS + 1:-len(".mp4")]
        writer_host, _, pid = owner.rpartition("-")
        if not pid.isdigit() or writer_host not in ("", host) or _pid_alive(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class Mp4Writer:
    """H.264 mp4 written frame by frame to a hidden temporary name, renamed into place on success.

    Used as a context manager: an exception inside the block deletes the temporary file, so an
    interrupted video never leaves a partial file under its final name; a killed process leaves its
    temporary file behind for `remove_stale_partials`.
    """

    def __init__(self, path, fps: int):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(_partial_name(self.path.name))
        self.fps = fps
        self.frames = 0
        self._writer = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # macro_block_size=1: without it imageio silently resizes frames not divisible by 16.
        self._writer = imageio.get_writer(
            self.tmp_path, fps=self.fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error"
        )
        return self

    def append(self, frames: np.ndarray) -> None:
        """frames: [n, H, W, 3] uint8."""
        for frame in frames:
            self._writer.append_data(frame)
        self.frames += len(frames)

    def __exit__(self, exc_type, exc, tb):
        try:
            self._writer.close()
        finally:
            if exc_type is None and self.frames > 0:
                os.replace(self.tmp_path, self.path)
            else:
                self.tmp_path.unlink(missing_ok=True)
        return False


def _checked_chunk(frames, shape) -> np.ndarray:
    """One [n, H, W, 3] uint8 chunk, the same frame size as the chunks before it (`shape`, or None)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        described = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise UserError(f"frames must be uint8 arrays [frames, height, width, 3] (as VideoPipeline returns), "
                        f"got {described}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise UserError(f"H.264 needs an even frame height and width, got {frames.shape[1]}x{frames.shape[2]}")
    if shape is not None and frames.shape[1:] != shape:
        raise UserError(f"frames change size from {list(shape)} to {list(frames.shape[1:])} within one video")
    return frames


def export_to_video(frames, path, fps: int = 16) -> Path:
    """Write frames to the H.264 mp4 `path` (atomically: a hidden file renamed into place when complete, so a
    failure never leaves a partial video under `path`; an existing file is replaced). Returns the path.

    frames: uint8 [n, H, W, 3], as `VideoPipeline(...)` returns, or an iterable of such chunks, as
    `VideoPipeline.stream(...)` yields (each chunk reaches the disk before the next is made).
    fps: 16 is Wan2.1's and inference.py's rate.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise UserError(f"export_to_video writes mp4 files; {path} does not end in .mp4")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps <= 0:
        raise UserError(f"fps must be a positive whole number, got {fps!r}")
    chunks = [frames] if isinstance(frames, np.ndarray) else frames
    shape = None
    with Mp4Writer(path, fps=fps) as writer:
        for chunk in chunks:
            shape = _checked_chunk(chunk, shape).shape[1:]
            writer.append(chunk)
        if writer.frames == 0:
            raise UserError(f"no frames to write to {path}")
    return path


def append_manifest(path, record: dict) -> None:
    """One JSON line, written with a single O_APPEND write so concurrent ranks do not interleave."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_manifest(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compact_manifest(path, order_key=lambda record: (record["prompt_index"], record["sample"])) -> None:
    """Keep the last record per file (re-runs with --overwrite append again), sorted, rewritten atomically."""
    latest = {record["file"]: record for record in read_manifest(path)}
    if not latest:
        return
    tmp = Path(path).with_suffix(".jsonl.tmp")
    tmp.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(latest.values(), key=order_key)),
        encoding="utf-8",
    )
    os.replace(tmp, path)
