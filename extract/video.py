"""Decode a video and sample its frames: the reader of the extract stage.

Frame sampling (the X-Pool / T-MASS protocol): the clip's ``n`` decoded frames are cut
into ``num_frames`` equal segments (boundaries ``linspace(0, n, num_frames + 1)``,
floored) and one frame is taken per segment: the middle one (``uniform``, the papers'
test protocol) or a random one (``random``, for augmentation runs; drawn from a
generator seeded by the run's seed and the video id, so a re-run samples the same
frames).

Short clips (fewer decoded frames than ``num_frames``), policy **mask**: every real
frame is kept once, in order, in the first slots; the remaining slots are padding,
with ``frame_mask`` False, ``frame_index`` -1 and an all-zero embedding row (finite, so
readers' NaN checks pass, and never mistaken for a frame since the mask says so).
Frames are never repeated, so mean pooling over the mask is the clip's true mean.

Decoding uses decord with one thread per reader (parallelism comes from the loader's
worker processes). A file that cannot be used raises :class:`VideoError` whose
``reason`` says what happened, short and stable enough to summarise (the part before
any colon is its kind): ``missing file``, ``permission denied``, ``a directory, not a
video file``, ``not a regular file`` (a device or pipe), ``zero-length file``,
``unreadable: <system message>``, ``no decodable video stream (unsupported codec?)``,
``undecodable: <decoder message>`` or ``too short: no frames``. The file is checked
(and its first byte read) before the decoder sees it, so a permission error is never
reported as undecodable.
"""

from __future__ import annotations

import stat
import zlib
from pathlib import Path

import numpy as np

SAMPLING_MODES = ("uniform", "random")
SHORT_CLIP_POLICY = "mask"
DECODER = "decord"


class VideoError(Exception):
    """A video that cannot be used; ``reason`` goes to the manifest's ``failed`` list."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def sample_indices(n_available: int, num_frames: int, mode: str = "uniform",
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which source frames fill the ``num_frames`` slots of a clip of ``n_available``.

    Returns ``frame_index [num_frames]`` int32 (-1 in padding slots) and
    ``frame_mask [num_frames]`` bool. ``rng`` is required for ``random``."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}")
    index = np.full(num_frames, -1, dtype=np.int32)
    if n_available < num_frames:
        index[:n_available] = np.arange(n_available)
        return index, index >= 0
    bounds = np.linspace(0, n_available, num_frames + 1).astype(np.int64)
    starts, stops = bounds[:-1], bounds[1:]  # [num_frames], every segment non-empty here
    if mode == "uniform":
        index[:] = (starts + stops - 1) // 2
    else:
        index[:] = rng.integers(starts, stops)
    return index, np.ones(num_frames, dtype=bool)


def video_rng(seed: int, video_id: str) -> np.random.Generator:
    """The random-sampling generator of one video: stable across runs and processes
    (``hash()`` is salted per process, CRC-32 is not)."""
    return np.random.default_rng([seed, zlib.crc32(video_id.encode("utf-8"))])


def read_frames(path: Path, num_frames: int, mode: str = "uniform", seed: int = 0,
                video_id: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the sampled frames of one video.

    Returns ``frames [n_real, height, width, 3]`` uint8 RGB (the real frames only, in
    slot order), ``frame_index [num_frames]`` int32 and ``frame_mask [num_frames]``
    bool. Raises :class:`VideoError` for anything unreadable."""
    import decord

    path = Path(path)
    _check_file(path)
    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        n_available = len(reader)
        if n_available == 0:
            raise VideoError("too short: no frames")
        index, mask = sample_indices(n_available, num_frames, mode, video_rng(seed, video_id))
        frames = reader.get_batch(index[mask].tolist()).asnumpy()
    except VideoError:
        raise
    except Exception as exc:  # decord raises RuntimeError or its own DECORDError
        raise VideoError(_reason(path, exc)) from exc
    return frames, index, mask


def _check_file(path: Path) -> None:
    """Raise :class:`VideoError` if ``path`` cannot be a readable video file."""
    try:
        status = path.stat()  # follows links: a broken one is a missing file
        if stat.S_ISDIR(status.st_mode):
            raise VideoError("a directory, not a video file")
        if not stat.S_ISREG(status.st_mode):
            raise VideoError("not a regular file")  # opening a pipe would block
        if status.st_size == 0:
            raise VideoError("zero-length file")
        with open(path, "rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        raise VideoError("missing file") from None
    except PermissionError:
        raise VideoError("permission denied") from None
    except OSError as exc:
        raise VideoError(f"unreadable: {exc.strerror or exc}") from None


def _reason(path: Path, exc: Exception) -> str:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "cannot find video stream" in message:
        return "no decodable video stream (unsupported codec?)"
    # decord prefixes messages with a timestamp and a source location; keep the gist
    gist = message.split("ERROR", 1)[-1].split("Error:", 1)[-1].strip(" :")
    return f"undecodable: {(_ffmpeg_error(path) or gist)[:200]}"


def _ffmpeg_error(path: Path) -> str | None:
    """FFmpeg's own words for why ``path`` does not open, or None if it opens. decord
    only logs them, raising a bare "Error reading <path>"; PyAV wraps the same FFmpeg
    and raises them."""
    import av

    try:
        av.open(str(path)).close()
    except av.FFmpegError as exc:
        return exc.strerror
    return None
