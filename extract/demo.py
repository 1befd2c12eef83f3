"""The demo dataset: short clips of coloured shapes, rendered by the project itself.

Deterministic in the seed (numpy only, no download) and written as real H.264 mp4 files
(PyAV, whose wheel ships its own FFmpeg), so the demo goes through the real decode path.

Each clip has ``min_scenes..max_scenes`` scenes (contiguous runs of frames). A scene
shows one *actor* shape doing one thing: moving left/right/up/down, appearing, turning
another colour, growing or shrinking; plus, often, a static distractor shape and a
background tone that no caption ever names. Each clip has ``min_captions..max_captions``
captions; a caption (:func:`caption`) names a random non-empty subset of the scenes, in
their order of events ("..., then ..."), sometimes without the colour. So the video
always shows more than any caption says, and the frames a caption is about are only some
of the clip's: text-conditioned pooling (X-Pool, T-MASS) can find them, a mean over all
frames (meanP) mixes them with scenes and distractors the caption never names.

Frames are square, so that a CLIP preprocessing (resize, then centre crop) sees the
whole frame. The demo encoder (:mod:`tmass.extract.demo_encoder`) is trained on clips
of the same generator with another seed, never on the clips rendered here.

Layout written under the data root (see :func:`tmass.extract.datasets.demo`):
``videos/<video_id>.mp4``, ``captions.json`` and ``demo-info.json`` (written last; a root
whose info matches the generator version and settings is not rendered again).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEMO_VERSION = 3
INFO = "demo-info.json"

COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "cyan": (40, 210, 220),
}
BACKGROUNDS = [(20, 20, 30), (45, 35, 25), (15, 45, 45), (55, 55, 55), (35, 20, 45), (10, 30, 15)]
SHAPES = ("circle", "square", "triangle")
EVENTS = ("moves left", "moves right", "moves up", "moves down", "appears", "turns", "grows", "shrinks")
EVENT_PHRASES = {"moves left": "moves to the left", "moves right": "moves to the right"}


@dataclass(frozen=True)
class DemoSpec:
    """Size of the demo set; the defaults are what ``--dataset demo`` renders."""

    # 400 training clips, so that the demo's validation fifth (80 clips, about 320
    # captions) can rank epochs; 100 test clips put chance R@1 at 1 %. The demo encoder
    # extracts them in seconds; ViT-B-32 needs about 6 minutes on a 2-core CPU.
    n_train: int = 400
    n_test: int = 100
    width: int = 96
    height: int = 96
    fps: int = 10
    seconds: float = 4.0
    min_scenes: int = 2
    max_scenes: int = 4
    min_captions: int = 3
    max_captions: int = 5
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    start: int
    stop: int
    background: tuple
    shape: str
    colour: str
    event: str
    new_colour: str  # the colour a "turns" event ends in (unused otherwise)
    origin: tuple  # actor centre (x, y) in [0, 1]
    distractor: tuple | None  # (shape, colour name, x, y) or None

    def phrase(self, rng: np.random.Generator | None = None) -> str:
        """What happens, in words; with ``rng`` the colour may be left out (a vaguer
        caption), without it the full description."""
        if self.event == "turns":  # the colour is the point of this event: always named
            return f"{_article(self.colour)} {self.colour} {self.shape} turns {self.new_colour}"
        vague = rng is not None and rng.random() <= 0.3
        noun = self.shape if vague else f"{self.colour} {self.shape}"
        return f"{_article(noun)} {noun} {EVENT_PHRASES.get(self.event, self.event)}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _scenes(spec: DemoSpec, n_frames: int, rng: np.random.Generator) -> list[Scene]:
    n = int(rng.integers(spec.min_scenes, spec.max_scenes + 1))
    cuts = np.sort(rng.choice(np.arange(3, n_frames - 2), size=n - 1, replace=False)) if n > 1 else []
    bounds = [0, *map(int, cuts), n_frames]
    scenes = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        colour, new_colour = rng.choice(list(COLOURS), size=2, replace=False)
        distractor = None
        if rng.random() < 0.6:
            distractor = (str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), float(rng.uniform(0.15, 0.85)), float(rng.uniform(0.15, 0.85)))
        scenes.append(Scene(
            start, stop, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], str(rng.choice(SHAPES)), str(colour),
            str(rng.choice(EVENTS)), str(new_colour), (float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.3, 0.7))), distractor,
        ))
    return scenes


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Pixels covered by a shape centred at (cx, cy) with half-size r (pixel units)."""
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= 0.85 * r) & (np.abs(yy - cy) <= 0.85 * r)
    depth = yy - (cy - r)  # an upright triangle widens downwards
    return (depth >= 0) & (yy <= cy + r) & (np.abs(xx - cx) <= 0.6 * depth)


def _render(scenes: list[Scene], spec: DemoSpec, n_frames: int) -> np.ndarray:
    """frames ``[n_frames, height, width, 3]`` uint8."""
    h, w = spec.height, spec.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base_r = 0.12 * min(h, w)
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    for scene in scenes:
        for t in range(scene.start, scene.stop):
            p = (t - scene.start) / max(1, scene.stop - scene.start - 1)  # progress through the scene, 0..1
            frame = frames[t]
            frame[:] = scene.background
            if scene.distractor:
                shape, colour, dx, dy = scene.distractor
                frame[_mask(shape, xx, yy, dx * w, dy * h, 0.7 * base_r)] = COLOURS[colour]
            x, y = scene.origin
            r, colour, visible = base_r, scene.colour, True
            travel = 0.6 * (p - 0.5)
            if scene.event == "moves left":
                x = 0.5 - travel
            elif scene.event == "moves right":
                x = 0.5 + travel
            elif scene.event == "moves up":
                y = 0.5 - travel
            elif scene.event == "moves down":
                y = 0.5 + travel
            elif scene.event == "appears":
                visible = p >= 0.4
            elif scene.event == "turns":
                colour = scene.new_colour if p >= 0.5 else scene.colour
            elif scene.event == "grows":
                r = base_r * (0.5 + p)
            elif scene.event == "shrinks":
                r = base_r * (1.5 - p)
            if visible:
                frame[_mask(scene.shape, xx, yy, x * w, y * h, r)] = COLOURS[colour]
    return frames


def caption(scenes: list[Scene], rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A caption naming a random non-empty subset of ``scenes`` in their order, and
    which scenes it names (``[n_scenes]`` bool)."""
    named = rng.random(len(scenes)) < 0.5
    named[rng.integers(len(scenes))] = True
    return ", then ".join(s.phrase(rng) for s, keep in zip(scenes, named) if keep), named


def _captions(scenes: list[Scene], spec: DemoSpec, rng: np.random.Generator) -> list[str]:
    """Distinct captions (a repeated caption would count twice in every metric); fewer
    than asked for only when the scenes cannot be described in that many ways."""
    wanted = int(rng.integers(spec.min_captions, spec.max_captions + 1))
    captions: list[str] = []
    for _ in range(20 * wanted):
        text = caption(scenes, rng)[0]
        if text not in captions:
            captions.append(text)
            if len(captions) == wanted:
                break
    return captions


def write_clip(path: Path, frames: np.ndarray, fps: int = 10, codec: str = "libx264") -> None:
    """Encode ``frames [n, height, width, 3]`` uint8 RGB into a video file (mp4 unless the
    suffix says otherwise); the codec is any FFmpeg encoder PyAV ships."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def _clip(spec: DemoSpec, index: int) -> tuple[list[Scene], int, np.random.Generator]:
    rng = np.random.default_rng([spec.seed, index])
    n_frames = int(round(spec.fps * spec.seconds))
    return _scenes(spec, n_frames, rng), n_frames, rng


def demo_clip(spec: DemoSpec, index: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Clip ``index``: frames ``[n_frames, height, width, 3]`` uint8, its captions, and
    the full description of every scene (what a caption could say at most)."""
    scenes, n_frames, rng = _clip(spec, index)
    return _render(scenes, spec, n_frames), _captions(scenes, spec, rng), [s.phrase() for s in scenes]


def demo_scenes(spec: DemoSpec, index: int) -> tuple[np.ndarray, list[Scene]]:
    """Clip ``index``: frames ``[n_frames, height, width, 3]`` uint8 and its scenes (the
    frame ranges a caption's phrases are about), for training the demo encoder."""
    scenes, n_frames, _ = _clip(spec, index)
    return _render(scenes, spec, n_frames), scenes


def render_demo(root: Path, spec: DemoSpec | None = None, progress: bool = True) -> Path:
    """Render the demo set into ``root`` (default spec unless given) and return it.

    Idempotent: a root already rendered by this generator version is kept as it is
    when ``spec`` is None (so a smaller set rendered by tests or the benchmark is used
    as found), and when its settings equal ``spec`` otherwise. Bump DEMO_VERSION
    whenever the generator or the defaults change."""
    root = Path(root)
    if (root / INFO).is_file():
        found = json.loads((root / INFO).read_text())
        if found.get("version") == DEMO_VERSION and (spec is None or found.get("spec") == dataclasses.asdict(spec)):
            return root
        (root / INFO).unlink(missing_ok=True)  # stale from here on: a killed re-render must not look finished
    spec = spec or DemoSpec()
    info = {"version": DEMO_VERSION, "spec": dataclasses.asdict(spec)}
    # Every file goes in under a temporary name, so that two processes rendering the same
    # root at once (the output is deterministic) never expose a half-written file.
    suffix = f".tmp-{os.getpid()}"
    items = []
    n_total = spec.n_train + spec.n_test
    for i in tqdm(range(n_total), desc=f"render demo clips into {root}", unit="clip", disable=not progress):
        frames, captions, scenes = demo_clip(spec, i)
        video_id = f"demo{i:04d}"
        tmp = root / "videos" / f".{video_id}{suffix}.mp4"
        write_clip(tmp, frames, spec.fps)
        os.replace(tmp, root / "videos" / f"{video_id}.mp4")
        items.append({"video_id": video_id, "split": "train" if i < spec.n_train else "test", "captions": captions,
                      "scenes": scenes})
    for name, content in (("captions.json", json.dumps(items, indent=1)), (INFO, json.dumps(info, indent=2))):
        (root / f".{name}{suffix}").write_text(content + "\n")
        os.replace(root / f".{name}{suffix}", root / name)  # the info last: a half-rendered root renders again
    return root
