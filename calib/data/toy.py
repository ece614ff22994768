"""The built-in toy benchmark: procedurally drawn "birds" on "land" / "water" backgrounds.

A miniature of Waterbirds that needs no download.  Every image is a deterministic function of
``(seed, image id)``: a foreground glyph of one of two bird classes (a compact, long-legged
*landbird* or a flat, long-necked *waterbird*) over one of two background families (land: forest,
field; water: ocean, lake), with random pose, size, colour and texture.  The background covers
most pixels and the bird a few percent, so a model that looks at the whole image is tempted to
use the background: the spurious feature of the real dataset.

:func:`make_toy_waterbirds` writes the images in *exactly* the Waterbirds layout (see
:mod:`calib.data.waterbirds`) with Waterbirds' split proportions and 95% train correlation, so
the real loader reads it.  The same renderer draws the separate image-caption corpus the toy CLIP
is trained on (:mod:`calib.clip.toyclip`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from calib.core.files import atomic_dir, locked
from calib.core.logs import progress as tqdm
from calib.data.base import DatasetLayoutError

log = logging.getLogger(__name__)

# Waterbirds group sizes per split (group g = 2*y + place): the toy keeps these proportions.
WATERBIRDS_GROUP_SIZES: dict[str, tuple[int, int, int, int]] = {
    "train": (3498, 184, 56, 1057),
    "val": (467, 466, 133, 133),
    "test": (2255, 2255, 642, 642),
}
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
LAND_STYLES = ("forest", "field")
WATER_STYLES = ("ocean", "lake")
CLASS_FOLDERS = ("001.Toy_Landbird", "002.Toy_Waterbird")
MARKER = "toy_benchmark.json"  # written last: its presence means the folder is complete
MANIFEST = "toy_files.json"  # sha256 of metadata.csv and every image's size, written just before the marker

# Bird colours shared by both classes, so colour alone never tells the class.
_BIRD_COLOURS = np.array(
    [[240, 240, 235], [30, 30, 35], [130, 130, 135], [140, 90, 50], [220, 190, 60], [190, 50, 40], [90, 60, 120]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the toy benchmark; fixed before any method was run (never tuned on results)."""

    seed: int = 0  # every image is a function of (seed, img_id)
    scale: float = 1.0  # multiplies Waterbirds' group sizes (1.0 = 11,788 images)
    image_size: int = 64  # square images, pixels

    def __post_init__(self) -> None:
        # a scale of 0 or below would quietly give the 2-per-group floor: a 24-image benchmark nobody asked for
        if not 0 < self.scale <= 1:
            raise ValueError(f"toy scale must be in (0, 1] (a fraction of Waterbirds' size), got {self.scale}")
        if self.seed < 0:
            raise ValueError(f"toy seed must be a non-negative integer, got {self.seed}")
        if self.image_size < 16:
            raise ValueError(f"toy image_size must be at least 16 pixels, got {self.image_size}")

    def group_sizes(self) -> dict[str, list[int]]:
        """Images per group per split: Waterbirds' sizes times ``scale``, at least 2 per group."""
        return {s: [max(2, int(round(n * self.scale))) for n in sizes] for s, sizes in WATERBIRDS_GROUP_SIZES.items()}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(coords, coords)  # x, y in [0, 1]


def _background(
    rng: np.random.Generator, place: int, size: int, styles: tuple[str, ...] = ()
) -> tuple[np.ndarray, str]:
    """An HxWx3 float image of a land (0) or water (1) scene and the style's name.

    ``styles``: the background styles allowed (empty: all four); a place must keep at least one.
    """
    x, y = _grid(size)
    jitter = rng.uniform(-25, 25, size=3).astype(np.float32)
    allowed = [s for s in (LAND_STYLES, WATER_STYLES)[place] if not styles or s in styles]
    if not allowed:
        raise ValueError(f"styles {styles} leave no background for {'water' if place else 'land'} scenes")
    if place == 0:
        style = allowed[rng.integers(len(allowed))]
        if style == "forest":
            base = np.array([40, 95, 40], np.float32) + jitter
            img = np.broadcast_to(base, (size, size, 3)).copy()
            for _ in range(rng.integers(3, 7)):  # tree trunks
                cx, w = rng.uniform(0, 1), rng.uniform(0.02, 0.05)
                img[np.abs(x - cx) < w] = np.array([90, 60, 35], np.float32) + rng.uniform(-15, 15, 3)
            canopy = np.sin(x * rng.uniform(15, 30) + rng.uniform(0, 6)) * np.sin(y * rng.uniform(15, 30))
            img[(canopy > 0.4) & (y < 0.5)] += np.array([-10, 40, -10], np.float32)
        else:  # field: sky band over grass strokes
            horizon = rng.uniform(0.25, 0.45)
            sky = np.array([150, 190, 225], np.float32) + jitter * 0.5
            grass = np.array([120, 160, 60], np.float32) + jitter
            img = np.where((y < horizon)[..., None], sky, grass)
            strokes = np.sin(x * rng.uniform(60, 90) + y * rng.uniform(5, 15)) > 0.6
            img[strokes & (y >= horizon)] += np.array([-30, -20, -10], np.float32)
    else:
        style = allowed[rng.integers(len(allowed))]
        if style == "ocean":
            base = np.array([30, 80, 160], np.float32) + jitter
            img = np.broadcast_to(base, (size, size, 3)).copy()
            waves = np.sin(y * rng.uniform(25, 45) + np.sin(x * rng.uniform(4, 9)) * 2.0)
            img[waves > 0.7] += np.array([50, 60, 60], np.float32)
        else:  # lake: sky band, calm water with reflections
            horizon = rng.uniform(0.2, 0.4)
            sky = np.array([170, 200, 230], np.float32) + jitter * 0.5
            water = np.array([50, 120, 150], np.float32) + jitter
            img = np.where((y < horizon)[..., None], sky, water)
            ripples = np.sin(y * rng.uniform(60, 90)) > 0.8
            img[ripples & (y >= horizon)] += np.array([30, 30, 30], np.float32)
    return img, style


def _draw_bird(rng: np.random.Generator, img: np.ndarray, bird: int) -> np.ndarray:
    """Paint a landbird (0) or waterbird (1) glyph onto ``img`` in place; return its ``[H, W]`` bool mask."""
    size = img.shape[0]
    x, y = _grid(size)
    s = rng.uniform(0.75, 1.25)
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.45, 0.7)
    facing = 1.0 if rng.random() < 0.5 else -1.0
    colour = _BIRD_COLOURS[rng.integers(len(_BIRD_COLOURS))] + rng.uniform(-20, 20, 3).astype(np.float32)
    accent = _BIRD_COLOURS[rng.integers(len(_BIRD_COLOURS))]
    dx = (x - cx) * facing  # > 0 is the direction the bird faces

    def ellipse(ex: float, ey: float, rx: float, ry: float) -> np.ndarray:
        return ((dx - ex) / rx) ** 2 + ((y - cy - ey) / ry) ** 2 <= 1.0

    def segment(x0: float, y0: float, x1: float, y1: float, w: float) -> np.ndarray:
        px, py = dx - x0, y - cy - y0
        vx, vy = x1 - x0, y1 - y0
        t = np.clip((px * vx + py * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        return (px - t * vx) ** 2 + (py - t * vy) ** 2 <= w * w

    if bird == 0:  # landbird: round body, head on top, short beak, two legs, upright tail
        body = ellipse(0, 0, 0.12 * s, 0.095 * s)
        head = ellipse(0.07 * s, -0.1 * s, 0.055 * s, 0.055 * s)
        beak = segment(0.11 * s, -0.1 * s, 0.16 * s, -0.09 * s, 0.015 * s)
        legs = segment(-0.03 * s, 0.08 * s, -0.04 * s, 0.17 * s, 0.01 * s) | segment(
            0.03 * s, 0.08 * s, 0.04 * s, 0.17 * s, 0.01 * s
        )
        tail = segment(-0.1 * s, 0.0, -0.17 * s, -0.09 * s, 0.025 * s)
        shape = body | head | tail
        extra = beak | legs
    else:  # waterbird: long flat body, long neck, small head, long beak, no legs
        body = ellipse(0, 0, 0.17 * s, 0.06 * s)
        neck = segment(0.12 * s, -0.02 * s, 0.15 * s, -0.2 * s, 0.02 * s)
        head = ellipse(0.16 * s, -0.21 * s, 0.04 * s, 0.035 * s)
        beak = segment(0.19 * s, -0.21 * s, 0.27 * s, -0.19 * s, 0.012 * s)
        shape = body | neck | head
        extra = beak
    img[shape] = colour
    if rng.random() < 0.5:  # texture: wing stripes in an accent colour
        stripes = (np.sin((dx + y) * rng.uniform(60, 100)) > 0.5) & shape
        img[stripes] = 0.6 * colour + 0.4 * accent
    img[extra] = np.array([235, 150, 40], np.float32)
    return shape | extra


def render_scene(
    rng: np.random.Generator, bird: int, place: int, size: int = 64, styles: tuple[str, ...] = ()
) -> tuple[np.ndarray, str]:
    """One toy image (``size x size x 3`` uint8) of ``bird`` (0 land, 1 water) on ``place`` (0 land, 1 water).

    Returns the image and the background style name (``forest``, ``field``, ``ocean``, ``lake``).  ``styles``
    restricts the backgrounds drawn (empty: all four).
    """
    img, style, _ = render_scene_with_mask(rng, bird, place, size, styles)
    return img, style


def render_scene_with_mask(
    rng: np.random.Generator, bird: int, place: int, size: int = 64, styles: tuple[str, ...] = ()
) -> tuple[np.ndarray, str, np.ndarray]:
    """:func:`render_scene` plus the bird's foreground mask ``[size, size]`` bool (every pixel the glyph
    painted: body, head, neck, tail, beak, legs).  Draws the same random numbers, so the image is identical."""
    img, style = _background(rng, place, size, styles)
    mask = _draw_bird(rng, img, bird)
    img += rng.normal(0, 8, img.shape).astype(np.float32)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8), style, mask


def _plan(cfg: ToyConfig) -> list[tuple[int, int, int]]:
    """(split code, y, place) per image, shuffled deterministically; img_id = position + 1."""
    rows = []
    for split, sizes in cfg.group_sizes().items():
        for g, n in enumerate(sizes):
            rows += [(SPLIT_CODES[split], g // 2, g % 2)] * n
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(rows))
    return [rows[i] for i in order]


def toy_config(root: Path) -> ToyConfig:
    """The :class:`ToyConfig` a toy benchmark folder was written with (read from its marker file)."""
    marker = Path(root).resolve() / MARKER
    if not marker.is_file():
        raise DatasetLayoutError(
            f"{Path(root).resolve()} is not a complete toy benchmark (no {MARKER}); make it with "
            "`python -m calib data make-toy --root DIR`"
        )
    return ToyConfig(**json.loads(marker.read_text()))


def foreground_masks(root: Path, img_ids: np.ndarray | list[int]) -> np.ndarray:
    """The bird's pixels in toy images ``img_ids`` of the benchmark at ``root``: ``[n, H, W]`` bool.

    Every toy image is a function of ``(seed, img_id)``, so the mask is recomputed exactly by re-running the
    generator (no mask files are stored).  The metadata's ``y`` and ``place`` fix what is drawn; they are read
    from ``metadata.csv`` so a mask always belongs to the image on disk.
    """
    import pandas as pd

    cfg = toy_config(root)
    meta = pd.read_csv(Path(root).resolve() / "metadata.csv").set_index("img_id")
    out = np.zeros((len(img_ids), cfg.image_size, cfg.image_size), bool)
    for k, img_id in enumerate(img_ids):
        if int(img_id) not in meta.index:
            raise KeyError(f"image id {img_id} is not in {root}/metadata.csv")
        row = meta.loc[int(img_id)]
        rng = np.random.default_rng([cfg.seed, int(img_id)])
        _, _, out[k] = render_scene_with_mask(rng, int(row["y"]), int(row["place"]), cfg.image_size)
    return out


def _image_name(y: int, img_id: int) -> str:
    return f"{CLASS_FOLDERS[y]}/{CLASS_FOLDERS[y][4:]}_{img_id:05d}.jpg"


def toy_problem(root: Path, cfg: ToyConfig) -> str | None:
    """What is wrong with a complete-looking toy benchmark at ``root`` (its marker says ``cfg``), or None.

    ``metadata.csv`` must list exactly the images the plan of ``cfg`` draws, and every image must be on disk.  A
    folder with a manifest must also match it (metadata bytes, image sizes: a truncated or replaced image shows);
    one made before manifests existed needs each image non-empty.  Only sizes are read, no image: as cheap as the
    loader's own check that every listed file exists.
    """
    meta = root / "metadata.csv"
    try:
        text = meta.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return f"{meta} cannot be read ({type(err).__name__})"
    plan = _plan(cfg)
    sizes: list[int] | None = None  # the image sizes written, when the folder has a manifest
    if (root / MANIFEST).is_file():
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            want_meta, sizes = manifest["metadata_sha256"], [int(n) for n in manifest["image_bytes"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{root / MANIFEST} cannot be read ({type(err).__name__})"
        if hashlib.sha256(text.encode()).hexdigest() != want_meta or len(sizes) != len(plan):
            return f"{meta} does not match {root / MANIFEST} (edited or damaged)"
    lines = text.splitlines()
    if len(lines) != len(plan) + 1:
        return f"{meta} lists {len(lines) - 1} images, not {len(plan)}"
    for idx, ((split, y, place), line) in enumerate(zip(plan, lines[1:])):
        rel = _image_name(y, idx + 1)
        if line.split(",")[:5] != [str(idx + 1), rel, str(y), str(split), str(place)]:
            return f"{meta} line {idx + 2} is not what the toy benchmark writes there"
        try:
            size = os.stat(root / rel).st_size
        except OSError:
            return f"image {root / rel} is missing"
        if size == 0 or (sizes is not None and size != sizes[idx]):
            return f"image {root / rel} has {size} bytes, not the {sizes[idx] if sizes else '> 0'} written"
    return None


def make_toy_waterbirds(root: Path, cfg: ToyConfig = ToyConfig(), overwrite: bool = False) -> Path:
    """Write the toy benchmark to ``root`` in the Waterbirds layout; reuse it if already complete and sound.

    A folder calib made (it holds the marker) that fails :func:`toy_problem` (images missing or damaged, metadata
    edited) is named in a warning and made again.  The folder is built under a temporary name and renamed at the
    end, so an interrupted run leaves nothing that looks valid; it is built under a lock on ``root``, so a second
    process asking for it meanwhile waits and then uses the first one's.  Returns ``root``.
    """
    root = Path(root).resolve()
    if not overwrite and _reusable(root, cfg, quiet=True):
        return root
    with locked(root, remove=True):
        # checked again under the lock: another process may have made it while this one waited
        if not overwrite and _reusable(root, cfg, quiet=False):
            return root
        plan = _plan(cfg)
        with atomic_dir(root) as tmp:
            for folder in CLASS_FOLDERS:
                (tmp / folder).mkdir()
            lines = ["img_id,img_filename,y,split,place,place_filename"]
            sizes = []
            for idx, (split, y, place) in enumerate(tqdm(plan, desc="toy images", unit="img", mininterval=2)):
                img_id = idx + 1
                rng = np.random.default_rng([cfg.seed, img_id])
                pixels, style = render_scene(rng, y, place, cfg.image_size)
                rel = _image_name(y, img_id)
                Image.fromarray(pixels).save(tmp / rel, quality=95)
                sizes.append((tmp / rel).stat().st_size)
                lines.append(f"{img_id},{rel},{y},{split},{place},/{style[0]}/{style}/toy_{img_id:05d}.jpg")
            text = "\n".join(lines) + "\n"
            (tmp / "metadata.csv").write_text(text)
            manifest = {"metadata_sha256": hashlib.sha256(text.encode()).hexdigest(), "image_bytes": sizes}
            (tmp / MANIFEST).write_text(json.dumps(manifest))
            (tmp / MARKER).write_text(json.dumps(asdict(cfg)))
    log.info("wrote %d toy images to %s", len(plan), root)
    return root


def _reusable(root: Path, cfg: ToyConfig, quiet: bool) -> bool:
    """Whether ``root`` holds a sound toy benchmark of ``cfg`` (True), or may be (re)made (False).

    Raises :class:`DatasetLayoutError` for a folder calib must not write over: another config's benchmark, or a
    folder that is not a toy benchmark.  Unless ``quiet``, a damaged benchmark is named in a warning.
    """
    marker = root / MARKER
    if not root.exists():
        return False
    if not marker.is_file():
        if any(root.iterdir()):
            raise DatasetLayoutError(f"{root} exists and is not a toy benchmark; refusing to write into it")
        return False
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        problem: str | None = f"{marker} cannot be read ({type(err).__name__})"
    else:
        if stored != asdict(cfg):
            raise DatasetLayoutError(
                f"{root} holds a toy benchmark made with {stored}, not {asdict(cfg)}; "
                "pass overwrite=True (CLI: --overwrite) or choose another --root"
            )
        problem = toy_problem(root, cfg)
    if problem is None:
        log.info("toy benchmark already at %s", root)
        return True
    if not quiet:
        log.warning("the toy benchmark at %s fails its check: %s; making it again", root, problem)
    return False
