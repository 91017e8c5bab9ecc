"""The shapes world: a tiny procedural text-to-image data set and a prompt-following score.

Like nanoGPT's character-level Shakespeare, this lets a reader train every stage of SVG-T2I end to
end on a CPU. Each image shows one to three shapes of one kind and one colour, grouped at one
position on a plain light-grey background, and its caption names all four facts:

    caption := COUNT COLOUR SHAPE POSITION
    COUNT    := "one" | "two" | "three"
    COLOUR   := "red" | "green" | "blue" | "yellow"
    SHAPE    := "circle" | "square" | "triangle"      (plural "circles" ... when COUNT > one)
    POSITION := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"

    e.g. "two red circles on the left", "one blue square at the top"
    (3 * 4 * 3 * 5 = 180 captions)

Everything is deterministic from a seed and nothing is downloaded. The second half is GenEval in
miniature: a classical analyser (colour segmentation, connected components, shape moments) reads an
image back into a scene, so a generated image can be scored against its prompt per category
(count, colour, shape, position).

Splits: the world is small, so every caption appears in training; images are held out by seed.
Training data is make_dataset(n, size, TRAIN_SEED); evaluation uses HELDOUT_SEED
(prompts from heldout_prompts, images and sampling noise from that seed), so no evaluation image is
ever a training image.

    python toy.py --check            # the analyser on ground-truth renders, clean and degraded
    python toy.py --grid shapes.png  # a contact sheet of samples, to look at
    python toy.py train --out runs/toy   # the toy SVG-T2I, end to end on a CPU (about 25 min)
    python toy.py lora                   # teach it a new word with a LoRA (train.py --lora)

The training command calls the trainers as a user would (train_autoencoder.main and train.main with
argument lists); they never import this file, and importing it needs no torch.
"""

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from plumbing.release import TOY_BUNDLE

# -------------------------------------------------------------------------------------------------
# the world

COUNTS = {"one": 1, "two": 2, "three": 3}
COLOURS = {  # saturated and far apart in hue (0, 50, 130, 225 degrees): they survive blur, noise
    "red": (220, 30, 30),
    "green": (20, 170, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # the caption's phrase, and the anchor (x, y) in [0, 1] the group sits around
    "left": ("on the left", (0.2, 0.5)),
    "right": ("on the right", (0.8, 0.5)),
    "top": ("at the top", (0.5, 0.2)),
    "bottom": ("at the bottom", (0.5, 0.8)),
    "centre": ("in the centre", (0.5, 0.5)),
}
BACKGROUND = (240, 240, 240)
TRAIN_SEED, HELDOUT_SEED = 0, 1

# Geometry, as fractions of the image side S. Shapes sit on a 4 x 4 grid whose cells are the DINOv3
# patches of a 64-px image (16 px; 32 px at 128): one shape per cell, so each latent token holds at
# most one shape, and each (position, count) has one arrangement of cells
# (a lone shape "in the centre" sits on the middle of the image, across four cells). Sizes and
# centres are jittered a little; a gap keeps shapes apart. A world this regular is what a
# 4.5M-parameter DiT can learn in twenty minutes on a CPU: with free placements it mixed
# arrangements (one shape drawn where two layouts overlap) and over-counted.
GRID = 4
SIZE_RANGE = (0.17, 0.19)  # side of a shape's bounding box (one per image, each shape within 5%)
JITTER = 0.005  # of each shape's centre, around its cell's centre
GAP = 0.03  # least empty space between two shapes' bounding boxes
EDGE = 0.01  # least space between a shape and the image border
CENTRE_BOX = 0.15  # the analyser calls a group "centre" when its centroid is this near the middle


def _cells(position, n):
    """The grid cells (column, row) of a group of n shapes at `position`."""
    if position == "centre":
        return [[(1.5, 1.5)], [(1, 1), (2, 2)], [(1, 1), (2, 1), (1, 2)]][n - 1]
    side = {"left": 0, "right": GRID - 1, "top": 0, "bottom": GRID - 1}[position]
    lines = [[1], [1, 2], [0, 1, 2]][n - 1]
    return [(side, k) if position in ("left", "right") else (k, side) for k in lines]


@dataclass(frozen=True)
class Scene:
    """What one image shows: count shapes of one colour and one kind, grouped at one position."""
    count: int  # 1, 2 or 3
    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    position: str  # a key of POSITIONS

    def __post_init__(self):
        if self.count not in COUNTS.values():
            raise ValueError(f"count must be one of {sorted(COUNTS.values())}, got {self.count!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {list(COLOURS)}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {list(SHAPES)}, got {self.shape!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {list(POSITIONS)}, got {self.position!r}")


def caption(scene):
    """The canonical caption of a scene, e.g. "two red circles on the left"."""
    count_word = {v: k for k, v in COUNTS.items()}[scene.count]
    noun = scene.shape + ("s" if scene.count > 1 else "")
    return f"{count_word} {scene.colour} {noun} {POSITIONS[scene.position][0]}"


def all_scenes():
    """Every scene of the world, in a fixed order."""
    return [Scene(n, c, s, p)
            for n in COUNTS.values() for c in COLOURS for s in SHAPES for p in POSITIONS]


CAPTIONS = [caption(s) for s in all_scenes()]  # all 180 captions: the corpus for the toy tokenizer
WORDS = sorted({w for c in CAPTIONS for w in c.split()})  # the 22 words they use


def parse_caption(text):
    """Read a prompt back into a Scene. Lenient about case, plurals, "center" and digits; strict
    about content."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    aliases = {"1": "one", "2": "two", "3": "three", "center": "centre", "middle": "centre"}
    words = [aliases.get(w, w) for w in words]
    singular = [w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w for w in words]

    def one_of(options, what):
        found = [w for w in singular if w in options]
        if len(set(found)) != 1:
            problem = "no" if not found else f"several ({', '.join(found)})"
            raise ValueError(f"cannot parse {text!r}: {problem} {what}; use one of "
                             f"{sorted(options)}, e.g. {CAPTIONS[0]!r}")
        return found[0]

    return Scene(count=COUNTS[one_of(COUNTS, "count")], colour=one_of(COLOURS, "colour"),
                 shape=one_of(SHAPES, "shape"), position=one_of(POSITIONS, "position"))


def sample_scene(rng):
    """A uniformly random scene (each category drawn independently)."""
    rng = np.random.default_rng(rng)
    return Scene(count=int(rng.integers(1, 4)), colour=str(rng.choice(list(COLOURS))),
                 shape=str(rng.choice(SHAPES)), position=str(rng.choice(list(POSITIONS))))


# -------------------------------------------------------------------------------------------------
# rendering


def position_of(x, y):
    """Which position a group of shapes with centroid (x, y) (in [0, 1]) is at: the rule the
    analyser uses."""
    dx, dy = x - 0.5, y - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_BOX:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _clearly_at(position, x, y):
    """Stricter than position_of: the ground truth keeps a margin from every boundary
    of the rule."""
    dx, dy = x - 0.5, y - 0.5
    if position == "centre":
        return max(abs(dx), abs(dy)) <= CENTRE_BOX - 0.07
    cross, along = (dx, dy) if position in ("left", "right") else (dy, dx)
    apart = abs(cross) >= CENTRE_BOX + 0.07 and abs(along) <= abs(cross) - 0.1
    return apart and position_of(x, y) == position


def _layout(scene, rng):
    """Shape centres and sizes (fractions of S) for a scene: grid cells, jittered, apart, clearly
    at the position."""
    n = scene.count
    cells = np.array(_cells(scene.position, n), dtype=float)
    for _ in range(1000):  # rejection sampling; a try or two on average
        d = rng.uniform(*SIZE_RANGE) * rng.uniform(0.95, 1.05, size=n)
        x = (cells[:, 0] + 0.5) / GRID + rng.uniform(-JITTER, JITTER, size=n)
        y = (cells[:, 1] + 0.5) / GRID + rng.uniform(-JITTER, JITTER, size=n)
        inside = np.all(x - d / 2 >= EDGE) and np.all(x + d / 2 <= 1 - EDGE) and \
            np.all(y - d / 2 >= EDGE) and np.all(y + d / 2 <= 1 - EDGE)
        apart = all(max(abs(x[i] - x[j]), abs(y[i] - y[j])) >= (d[i] + d[j]) / 2 + GAP
                    for i in range(n) for j in range(i))
        if inside and apart and _clearly_at(scene.position, x.mean(), y.mean()):
            return x, y, d
    raise RuntimeError(f"could not lay out {scene}")  # never for the ranges above (tests cover it)


def _draw(draw, shape, cx, cy, d, fill):
    """Draw one shape filling the d x d box centred at (cx, cy) (pixels). Triangles point up."""
    if shape == "circle":
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill)
    else:
        draw.polygon([(cx, cy - d / 2), (cx + d / 2, cy + d / 2), (cx - d / 2, cy + d / 2)],
                     fill=fill)


def render(scene, size=128, rng=None):
    """Render a scene to an RGB image of size x size. Drawn 4x larger and box-downsampled, for
    clean edges."""
    if size < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {size}; use e.g. 64 or 128")
    x, y, d = _layout(scene, np.random.default_rng(rng))
    big = 4 * size
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for xi, yi, di in zip(x, y, d):
        _draw(draw, scene.shape, xi * big, yi * big, di * big, COLOURS[scene.colour])
    return image.resize((size, size), Image.BOX)


def make_dataset(n, size=128, seed=TRAIN_SEED):
    """n (image, caption) pairs. Item i depends only on (seed, i), so a longer data set extends a
    shorter one."""
    data = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        data.append((render(scene, size, rng), caption(scene)))
    return data


def heldout_prompts(n, seed=HELDOUT_SEED):
    """n evaluation prompts, balanced: every caption once (in a seeded order) before
    any repeats."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(CAPTIONS)) for _ in range(n // len(CAPTIONS) + 1)])
    return [CAPTIONS[i] for i in order[:n]]


def degrade(image, rng=None, blur=1.0, noise=0.05):
    """Soften an image the way a generative model does: Gaussian blur
    (radius in pixels at 128, scaled with the image size) and additive Gaussian noise
    (std as a fraction of full range). Used to test the analyser."""
    rng = np.random.default_rng(rng)
    image = image.filter(ImageFilter.GaussianBlur(blur * image.width / 128))
    a = np.asarray(image, dtype=np.float32) / 255 + rng.normal(0, noise,
                                                               size=(image.height, image.width, 3))
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


# -------------------------------------------------------------------------------------------------
# the analyser: GenEval in miniature
#
# Pixels with colour (the background is grey) are grouped into connected blobs; specks are dropped.
# A blob's colour is the palette hue nearest its mean hue. Its shape comes from two numbers that
# are sums over many pixels, so they barely move under blur and noise, measured on a soft mask m
# (1 inside, fading at the edges):
#   fill = (tallest column of m) * (widest row of m) / (area of m): square 1, circle 4/pi = 1.27,
#   triangle 2; skew = skewness of m's mass from top to bottom: circle and square 0; an upright
#   triangle, wide at the
#          bottom, -0.57.
# The group's position is position_of() at the blobs' mean centre, the rule the renderer
# keeps a margin from.

CHROMA_MIN = 0.2  # a pixel may belong to a shape when max(rgb) - min(rgb) exceeds this
# Thresholds (as measured on degraded renders):
AREA_MIN = 0.004  # blobs below this fraction of the image are specks (shapes are >= 0.018)
SKEW_MAX = -0.2  # a blob skewed below this is a triangle (triangles < -0.29, others > -0.1)
FILL_MAX = 1.18  # otherwise a square when its fill is below this (squares < 1.17 < circles)


@dataclass
class Blob:
    """One detected shape: its colour, kind, centre (x, y in [0, 1]), area
    (fraction of the image), features."""
    colour: str
    shape: str
    x: float
    y: float
    area: float
    fill: float
    skew: float


@dataclass
class Detection:
    """What the analyser sees: like a Scene (None where nothing was found), plus the
    shapes it found."""
    count: int
    colour: str
    shape: str
    position: str
    blobs: list = field(default_factory=list)


def _opponent(rgb):
    """Two opponent-colour axes (..., 2) whose angle is the hue and whose length is
    about the chroma."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([r - (g + b) / 2, (g - b) * math.sqrt(3) / 2], axis=-1)


_HUES = {name: math.atan2(*_opponent(np.array(c, dtype=np.float64) / 255)[::-1])
         for name, c in COLOURS.items()}


def _components(mask):
    """Label the 4-connected components of a boolean mask (-1 off the mask). Every pixel starts
    with its own index as label and repeatedly takes the smallest label among its neighbours, then
    the label of the pixel its label names (pointer jumping, so long shapes need few rounds), until
    nothing changes."""
    h, w = mask.shape
    off = h * w  # the label of pixels off the mask, larger than any index
    lab = np.where(mask, np.arange(off).reshape(h, w), off)
    while True:
        p = np.pad(lab, 1, constant_values=off)
        new = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        new = np.where(mask, new, off)
        new = np.append(new.ravel(), off)[new]  # labels always name a pixel of the same component
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def _as_rgb_array(image):
    """PIL image or (H, W, 3) array (uint8, or float in [0, 1]) -> float32 (H, W, 3) in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got shape {a.shape}; pass a "
                         "PIL image instead")
    a = a.astype(np.float32)
    return a / 255 if np.asarray(image).dtype == np.uint8 else np.clip(a, 0, 1)


def _shape_features(m):
    """fill and skew (see above) of a soft mask m (h, w) in [0, 1]."""
    area = m.sum()
    fill = m.sum(0).max() * m.sum(1).max() / area
    rows = m.sum(1)
    t = np.arange(len(rows))
    mean = (rows * t).sum() / area
    var = (rows * (t - mean) ** 2).sum() / area
    skew = (rows * (t - mean) ** 3).sum() / area / var ** 1.5 if var > 0 else 0.0
    return float(fill), float(skew)


def analyse(image):
    """Read an image (PIL, or an (H, W, 3) array) back into a Detection of its shapes."""
    rgb = _as_rgb_array(image)
    h, w, _ = rgb.shape
    # a 3x3 median filter removes pixel noise without moving edges
    smooth = Image.fromarray((rgb * 255).round().astype(np.uint8))
    smooth = smooth.filter(ImageFilter.MedianFilter(3))
    rgb = np.asarray(smooth, dtype=np.float32) / 255
    chroma = rgb.max(-1) - rgb.min(-1)
    opp = _opponent(rgb)
    labels = _components(chroma > CHROMA_MIN)
    blobs = []
    for i in np.unique(labels[labels >= 0]):
        ys, xs = np.nonzero(labels == i)
        if len(ys) < AREA_MIN * h * w:
            continue
        # The low threshold finds faint shapes, but noise can bridge close neighbours into one
        # blob. A shape's edge is where the chroma falls to half its own
        # (the middle of a blurred step), whatever its colour, so cut there and keep the parts
        # that fall apart.
        level = np.median(chroma[ys, xs])
        y0, x0 = ys.min(), xs.min()
        box = (slice(y0, ys.max() + 1), slice(x0, xs.max() + 1))
        parts = _components((labels[box] == i) & (chroma[box] >= level / 2))
        for j in np.unique(parts[parts >= 0]):
            ys, xs = np.nonzero(parts == j)
            if len(ys) < AREA_MIN * h * w:
                continue
            ys, xs = ys + y0, xs + x0
            hue = math.atan2(*opp[ys, xs].sum(0)[::-1])
            colour = min(_HUES, key=lambda c: abs(math.remainder(hue - _HUES[c], 2 * math.pi)))
            # the soft mask: the part's box grown by a pixel, its blob's pixels weighted by
            # relative chroma
            near = (slice(max(ys.min() - 1, 0), ys.max() + 2),
                    slice(max(xs.min() - 1, 0), xs.max() + 2))
            m = np.clip(chroma[near] / level, 0, 1) * (labels[near] == i)
            fill, skew = _shape_features(m)
            shape = "triangle" if skew < SKEW_MAX else "square" if fill < FILL_MAX else "circle"
            blobs.append(Blob(colour, shape, (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h,
                              len(ys) / (h * w), fill, skew))
    if not blobs:
        return Detection(0, None, None, None, [])

    def majority(values):
        return max(sorted(set(values)), key=values.count)

    position = position_of(np.mean([b.x for b in blobs]), np.mean([b.y for b in blobs]))
    return Detection(len(blobs), majority([b.colour for b in blobs]),
                     majority([b.shape for b in blobs]), position, blobs)


def score(image, text):
    """Check an image against its caption, per category. colour and shape hold only when every
    detected shape has them (and at least one was found); overall holds when all four do."""
    want = text if isinstance(text, Scene) else parse_caption(text)
    got = analyse(image)
    result = {
        "count": got.count == want.count,
        "colour": bool(got.blobs) and all(b.colour == want.colour for b in got.blobs),
        "shape": bool(got.blobs) and all(b.shape == want.shape for b in got.blobs),
        "position": got.position == want.position,
    }
    result["overall"] = all(result.values())
    return result


CATEGORIES = ("count", "colour", "shape", "position", "overall")


def summarise(scores):
    """Mean accuracy per category over a list of score() results."""
    return {k: float(np.mean([s[k] for s in scores])) for k in CATEGORIES}


def wrong_caption(scene, category, rng):
    """The caption of scene with one category changed to a different random value
    (to check scores fail)."""
    options = {"count": list(COUNTS.values()), "colour": list(COLOURS), "shape": list(SHAPES),
               "position": list(POSITIONS)}[category]
    value = getattr(scene, category)
    other = [o for o in options if o != value][int(rng.integers(len(options) - 1))]
    return caption(Scene(**{**scene.__dict__, category: other}))


# -------------------------------------------------------------------------------------------------
# preparing and training the toy SVG-T2I: python toy.py train runs train() below
#
# Every part is the real code path with tiny sizes: a random DINOv3
# (a stand-in for the pretrained one: with its LayerScale at the official 1e-5 init, its features
# are a faithful, nearly linear code of each 16x16 patch), a random Gemma-2 with a sentencepiece
# tokenizer trained on the captions, a decoder trained on reconstruction, latent statistics
# computed from the data (official file format) and a NextDiT trained by flow matching.

SIZE = 64  # the toy's images: a 4 x 4 grid of DINOv3 patches
# the bundled toy model, which sample.py --toy reads, and its sampling defaults (in its run.json)
BUNDLE = TOY_BUNDLE
SAMPLING = dict(steps=25, cfg=4.0, shift=2.0, solver="euler", system_prompt="empty")


def write_data(folder, n, seed=TRAIN_SEED):
    """n training images of the shapes world as PNGs, and the data.jsonl that lists them."""
    return write_pairs(folder, make_dataset(n, size=SIZE, seed=seed))


def write_pairs(folder, pairs):
    """(image, caption) pairs as PNGs and the data.jsonl of train.py that lists them."""
    from plumbing.files import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, text) in enumerate(pairs):
        image.save(folder / f"{i:06d}.png")
        lines.append(json.dumps({"path": f"{i:06d}.png", "prompt": text}))
    text = "\n".join(lines) + "\n"
    return atomic_write(folder / "data.jsonl", lambda tmp: tmp.write_text(text))


# the toy decoder's recipe for train_autoencoder.py: the whole 64-px images (fixed-size crops at 64
# px), no LPIPS, no GAN, and three options the paper's recipe does not use: 94% of a render is one
# exact grey, and with L1 alone the background's gradient, larger than the shapes' and opposed to
# it, keeps the shapes undrawn for hundreds of steps; an L2 term (weighted 10 x the L1: the
# squared errors of the few shape pixels then lead), Adam's usual betas and a cosine decay draw
# them (held-out PSNR and the score per weight: README)
DECODER_RECIPE = dict(global_batch=16, lr=2e-3, l2_weight=10.0, betas="0.9,0.999",
                      lr_schedule="cosine")


def train_decoder(ae_path, data, steps, out, seed=0, threads=None, log=print):
    """Train the decoder of the autoencoder file `ae_path` (its random decoder is the init, its
    frozen DINOv3 the encoder) on the images of `data` with train_autoencoder.py's own loop
    (DECODER_RECIPE); the run lives in `out` and is resumed if it exists. The trained decoder is
    written back into `ae_path`."""
    from safetensors.torch import save_file

    import train_autoencoder
    from plumbing.files import atomic_write, read_state_dict
    from plumbing.release import checkpoint_folder

    argv = ["--ae", "P", "--data", str(data), "--out", str(out), "--init-from", str(ae_path),
            "--perceptual-weight", "0", "--disc-weight", "0", "--resolution", str(SIZE),
            "--crops", "fixed", "--steps", str(steps), "--seed", str(seed), "--workers", "0",
            "--log-every", "200", "--save-every", str(steps), "--keep", "1",
            *(f"--{k.replace('_', '-')}={v}" for k, v in DECODER_RECIPE.items())]
    if threads:
        argv += ["--threads", str(threads)]
    if (Path(out) / "latest").is_file():
        argv.append("--resume")
    train_autoencoder.main(argv)
    reached(out, steps, "decoder")
    trained = read_state_dict(Path(checkpoint_folder(str(out))) / "autoencoder.safetensors")
    sd = {k: v.clone() for k, v in read_state_dict(ae_path).items()}
    sd.update({k: v.contiguous() for k, v in trained.items() if k.startswith("decoder.")})
    atomic_write(ae_path, lambda tmp: save_file(sd, str(tmp)))
    log(f"toy decoder: {steps} steps of train_autoencoder.py, written into {ae_path}")


def reached(run, steps, what):
    """Go on only from a run that reached its steps: a trainer stopped by a signal (SIGTERM, a
    scheduler's preemption) saves and returns as if done."""
    from plumbing import UsageError
    from plumbing.release import checkpoint_folder

    step = json.loads((Path(checkpoint_folder(str(run))) / "run.json").read_text())["step"]
    if step < steps:
        raise UsageError(f"the {what} stopped at step {step} of {steps}: continue with the same "
                         "command and --resume")


def prepare(work, n_images=6000, decoder_steps=2000, seed=0, log=print, phases=None):
    """Everything the toy's DiT stage needs, in `work` (each part is kept, so a rerun reuses it):
    the data (work/data), the frozen parts with the decoder trained (work/frozen; its run in
    work/decoder). Returns {"data", "autoencoder", "dinov3", "gemma"} paths; `phases` gets the
    seconds each part took."""
    import torch

    from dinov3 import DINOv3Config
    from decoder import DecoderConfig
    from plumbing.files import atomic_write
    from plumbing.tiny import make_tiny_frozen

    work, phases, t0 = Path(work), {} if phases is None else phases, time.time()
    data = work / "data" / "data.jsonl"
    if not data.is_file():
        log(f"toy data: {n_images} images of {SIZE}px")
        write_data(work / "data", n_images)
        phases["data"], t0 = time.time() - t0, time.time()
    frozen_json = work / "frozen.json"
    if not frozen_json.is_file():
        log("toy frozen parts: random DINOv3 (dim 128) and Gemma-2 (hidden 64), tokenizer on the "
            "toy captions")
        made = make_tiny_frozen(str(work / "frozen"), list(CAPTIONS) + [""], seed=seed,
                                dinov3_config=DINOv3Config(dim=128, depth=2, n_heads=2,
                                                           ffn_dim=256),
                                decoder_config=DecoderConfig(z_channels=128, ch=32,
                                                             num_res_blocks=0))
        train_decoder(made["autoencoder"], data, decoder_steps, work / "decoder", seed=seed,
                      threads=torch.get_num_threads(), log=log)
        text = json.dumps(made)
        atomic_write(frozen_json, lambda tmp: tmp.write_text(text))
        phases["frozen parts and decoder"] = time.time() - t0
    return {"data": str(data), **json.loads(frozen_json.read_text())}


def write_bundle(bundle, run_dir, frozen):
    """The finished toy model, in the layout sample.py reads: the DiT's EMA weights, the
    autoencoder, the latent statistics, the Gemma folder, and run.json with the sampling defaults.
    Weights are stored in fp16 (half the size; the loaders cast them to the model dtype)."""
    from safetensors.torch import save_file

    from plumbing.files import atomic_write, read_state_dict
    from plumbing.release import checkpoint_folder

    ckpt = Path(checkpoint_folder(str(run_dir)))
    run = json.loads((ckpt / "run.json").read_text())

    def half(sd):
        return {k: (v.half() if v.is_floating_point() and not k.endswith("periods") else v)
                .contiguous() for k, v in sd.items()}

    def write(tmp):
        tmp.mkdir()
        save_file(half(read_state_dict(ckpt / "ema.safetensors")), str(tmp / "ema.safetensors"))
        save_file(half(read_state_dict(frozen["autoencoder"])),
                  str(tmp / "autoencoder.safetensors"))
        shutil.copyfile(ckpt / "latent_stats.pt", tmp / "latent_stats.pt")
        shutil.copytree(frozen["gemma"], tmp / "text_encoder")
        info = {"frozen": {}, "resolution": SIZE, "sample": SAMPLING, "model": run["model"],
                "trained": {"step": run.get("step"), "note": "python toy.py train"}}
        (tmp / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return atomic_write(bundle, write)


def train(args):
    """python toy.py train: the whole toy SVG-T2I, end to end, on a CPU: prepare() (the shapes
    world's images and captions, tiny frozen parts, the decoder trained on reconstruction), then
    train.py on --model toy (its recipe: train.TOY_STAGE; latent statistics computed from the
    data, features cached), then the bundle sample.py --toy reads. The flags a user set
    (--steps, --global-batch, --lr, --ema-decay) override the recipe."""
    import torch

    import train as dit_trainer
    from plumbing import UsageError
    from plumbing.runs import Dist, fmt_time

    t_start = time.time()
    work = Path(os.path.abspath(args.out))
    if (work / "dit" / "latest").is_file() and not args.resume:
        raise UsageError(f"{work} already holds a toy run: pass --resume to continue it, "
                         "or choose another --out")
    work.mkdir(parents=True, exist_ok=True)
    log = Dist(log_file=work / "log.txt").log
    torch.set_num_threads(args.threads or torch.get_num_threads())
    phases = {}                                 # seconds of each part this command ran
    made = prepare(work, args.images, args.decoder_steps, args.seed, log, phases)
    argv = ["--model", "toy", "--data", made["data"], "--out", str(work / "dit"),
            "--autoencoder", made["autoencoder"], "--gemma", made["gemma"], "--system-prompt",
            "empty", "--cache", str(work / "cache"), "--seed", str(args.seed), "--threads",
            str(torch.get_num_threads()), "--precision", "fp32", "--text-dtype", "fp32",
            "--keep", "2"]
    for name in ("global_batch", "steps", "lr", "ema_decay"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    t0 = time.time()
    if (work / "dit" / "latest").is_file():
        argv.append("--resume")
    else:                   # a run of 0 steps: the latent statistics and the feature cache, timed
        dit_trainer.main(argv + ["--steps", "0"])
        phases["statistics and feature cache"], t0 = time.time() - t0, time.time()
    dit_trainer.main(argv)
    reached(work / "dit", args.steps or dit_trainer.TOY_STAGE["steps"], "DiT")
    phases["DiT"], t0 = time.time() - t0, time.time()
    bundle = os.path.abspath(args.bundle or BUNDLE)
    write_bundle(bundle, work / "dit", made)
    phases["bundle"] = time.time() - t0
    log(f"toy model written to {bundle} ({fmt_time(time.time() - t_start)} in all: "
        f"{', '.join(f'{k} {fmt_time(v)}' for k, v in phases.items())})")
    where = "--toy" if bundle == BUNDLE else "--ckpt " + bundle
    log(f"score it: python sample.py {where} --score")


# -------------------------------------------------------------------------------------------------
# A new word, taught by LoRA: python toy.py lora
# "crimson" is a word the bundled model never read (its tokenizer spells it in five pieces). A LoRA
# trained by train.py --lora on a few hundred renders makes it mean red; the analyser reads back,
# on held-out prompts, how often "crimson" comes out red, and whether the rest is remembered.

NEW_WORD, MEANING = "crimson", "red"
WORD_SEED = 2           # the LoRA's renders (TRAIN_SEED and HELDOUT_SEED are taken)
LORA_RECIPE = dict(rank=4, images=400, steps=300, global_batch=16, lr=1e-3)


def with_word(text):
    """A caption with the colour MEANING renamed NEW_WORD: "two crimson circles on the left"."""
    return " ".join(NEW_WORD if w == MEANING else w for w in text.split())


def write_word_data(folder, n, seed=WORD_SEED):
    """n renders for the LoRA: every other one a red scene captioned with the new word, the rest
    random scenes with their own captions (rehearsal: the word is learnt, the rest kept)."""
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        if i % 2 == 0:
            scene = Scene(scene.count, MEANING, scene.shape, scene.position)
        image = render(scene, SIZE, rng)
        pairs.append((image, with_word(caption(scene)) if i % 2 == 0 else caption(scene)))
    return write_pairs(folder, pairs)


def word_prompts(n, seed=HELDOUT_SEED):
    """n held-out prompts with the new word: the held-out prompts of red scenes, renamed. Returns
    (prompt, the caption it means)."""
    reds = [p for p in heldout_prompts(4 * n + len(CAPTIONS), seed) if MEANING in p.split()]
    return [(with_word(p), p) for p in reds[:n]]


def evaluate_word(pipe, n_word=60, n_heldout=180, seed=0):
    """The pipeline on n_word new-word prompts (the share drawn in the colour the word means) and
    on the n_heldout prompts of sample.py --score (their summary). Returns (share, summary,
    the new-word images)."""
    from svgt2i import Sampling

    def draw(prompts):          # image k from seed + k, as sample.py --score draws them
        return pipe.generate(prompts, SIZE, SIZE, seed=seed, sampling=Sampling(**SAMPLING),
                             batch_size=30)
    words, prompts = word_prompts(n_word), heldout_prompts(n_heldout)
    images = draw([w for w, _ in words])
    share = float(np.mean([score(im, meant)["colour"] for im, (_, meant) in zip(images, words)]))
    return share, summarise([score(im, p) for im, p in zip(draw(prompts), prompts)]), images


def teach_word(args):
    """python toy.py lora: the new-word renders, train.py --lora on the bundle (rank, steps and lr of
    LORA_RECIPE unless given), then the bundle before and after the LoRA, measured."""
    import torch

    import train as dit_trainer
    from plumbing.runs import Dist
    from svgt2i import SVGT2I

    work, bundle = Path(os.path.abspath(args.out)), Path(os.path.abspath(args.bundle or BUNDLE))
    work.mkdir(parents=True, exist_ok=True)
    log = Dist(log_file=work / "log.txt").log
    recipe = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in LORA_RECIPE.items()}
    if not (work / "data" / "data.jsonl").is_file():
        write_word_data(work / "data", recipe["images"])
    run = work / "lora"
    argv = ["--model", "toy", "--data", str(work / "data" / "data.jsonl"), "--out", str(run),
            "--init-from", str(bundle / "ema.safetensors"), "--autoencoder",
            str(bundle / "autoencoder.safetensors"), "--gemma", str(bundle / "text_encoder"),
            "--stats", str(bundle / "latent_stats.pt"), "--system-prompt", "empty", "--cache",
            str(work / "cache"),
            "--precision", "fp32", "--text-dtype", "fp32", "--seed", str(args.seed),
            "--lora", str(recipe["rank"]), "--steps", str(recipe["steps"]), "--global-batch",
            str(recipe["global_batch"]), "--lr", str(recipe["lr"]), "--save-every",
            str(recipe["steps"]), "--keep", "1", "--log-every", "50"]
    dit_trainer.main(argv + (["--resume"] if (run / "latest").is_file() else []))
    reached(run, recipe["steps"], "LoRA")
    results = {}
    for name, lora in (("before", ()), ("after", [(run, 1.0)])):
        pipe = SVGT2I.from_pretrained(str(bundle), str(bundle / "text_encoder"),
                                      dtype=torch.float32, lora=lora)
        results[name] = evaluate_word(pipe, args.prompts, args.heldout)
        share, summary, _ = results[name]
        log(f"{name} the LoRA: '{NEW_WORD}' drawn {MEANING} in {share:.3f} of {args.prompts} "
            f"held-out prompts; the {args.heldout} held-out prompts score "
            f"{summary['overall']:.3f} ({', '.join(f'{k} {summary[k]:.3f}' for k in CATEGORIES[:4])})")
    if args.sheet:
        save_sheet(args.sheet, [results["before"][2][:8], results["after"][2][:8]])
    return results


def save_sheet(path, rows, gap=2):
    """Rows of images as one picture, white gaps between them."""
    size = rows[0][0].size[0]
    sheet = Image.new("RGB", (len(rows[0]) * (size + gap) - gap, len(rows) * (size + gap) - gap),
                      "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (c * (size + gap), r * (size + gap)))
    sheet.save(path)


# -------------------------------------------------------------------------------------------------
# command line


def check(n=500, size=128, seed=HELDOUT_SEED):
    """Print the analyser's accuracy on n ground-truth renders, clean and degraded, and its
    rejection rate of captions that are wrong in one category. Returns the clean summary."""
    data = make_dataset(n, size, seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    clean = summarise([score(im, cap) for im, cap in data])
    t1 = time.time()
    rows = [("clean", clean)]
    for blur, noise in [(1.0, 0.05), (1.5, 0.08)]:
        rows.append((f"blur {blur} + noise {noise}",
                     summarise([score(degrade(im, rng, blur, noise), cap) for im, cap in data])))
    print(f"analyser on {n} ground-truth renders at {size}x{size} ({1000 * (t1 - t0) / n:.1f} ms "
          "per image)")
    print(f"{'':24s}" + "".join(f"{k:>10s}" for k in CATEGORIES))
    for name, s in rows:
        print(f"{name:24s}" + "".join(f"{s[k]:10.3f}" for k in CATEGORIES))
    rejected = {}
    for category in CATEGORIES[:4]:
        wrong = [score(im, wrong_caption(parse_caption(cap), category, rng)) for im, cap in data]
        rejected[category] = float(np.mean([not s["overall"] and not s[category] for s in wrong]))
    print("wrong captions rejected  " + "".join(f"{k}: {v:.3f}  " for k, v in rejected.items()))
    return clean


def grid(path, n=24, size=128, seed=TRAIN_SEED, columns=6):
    """Save a contact sheet of the first n training images and print their captions."""
    data = make_dataset(n, size, seed)
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (size + 2), rows * (size + 2)), (0, 0, 0))
    for i, (im, cap) in enumerate(data):
        sheet.paste(im, ((i % columns) * (size + 2), (i // columns) * (size + 2)))
        print(f"{i:3d}  {cap}")
    sheet.save(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The shapes world: data, a prompt-following score, "
                                            "and the toy SVG-T2I trained on it.")
    p.add_argument("--check", action="store_true",
                   help="validate the analyser on ground-truth renders")
    p.add_argument("--grid", metavar="PNG", help="save a contact sheet of training samples")
    p.add_argument("--n", type=int, default=500, help="images for --check (default 500)")
    p.add_argument("--size", type=int, default=128, help="image size (default 128)")
    commands = p.add_subparsers(dest="command", metavar="{train,lora}")
    t = commands.add_parser("train", help="train the toy SVG-T2I on a CPU: data, frozen parts, "
                            "decoder (train_autoencoder.py), DiT (train.py), bundle")
    t.add_argument("--out", default="runs/toy",
                   help="the run's folder: data, frozen parts, both runs (default runs/toy)")
    t.add_argument("--images", type=int, default=6000,
                   help="training images of the shapes world (default 6000)")
    t.add_argument("--decoder-steps", type=int, default=2000, help="decoder reconstruction "
                   "steps of train_autoencoder.py, batch 16 (default 2000)")
    t.add_argument("--bundle", default=None, help="where the finished model goes (default: "
                   "assets/toy, the folder sample.py --toy reads)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--steps", type=int, default=None, help="DiT steps (default: train.py's toy "
                   "recipe, 2200)")
    t.add_argument("--global-batch", type=int, default=None, help="DiT batch (default 64)")
    t.add_argument("--lr", type=float, default=None, help="DiT learning rate (default 1e-3)")
    t.add_argument("--ema-decay", type=float, default=None, help="DiT EMA decay (default 0.999)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the frozen parts, the decoder and the DiT (default 0)")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice)")
    w = commands.add_parser("lora", help=f"teach the bundled model the word '{NEW_WORD}' "
                            "(train.py --lora), and measure it before and after")
    w.add_argument("--out", default="runs/toy-lora", help="the run's folder (default "
                   "runs/toy-lora)")
    w.add_argument("--bundle", default=None, help="the toy model to teach (default assets/toy)")
    for name, what in (("rank", "LoRA rank"), ("images", "training renders"),
                       ("steps", "LoRA steps"), ("global_batch", "batch"), ("lr", "learning rate")):
        w.add_argument("--" + name.replace("_", "-"), type=type(LORA_RECIPE[name]), default=None,
                       help=f"{what} (default {LORA_RECIPE[name]})")
    w.add_argument("--seed", type=int, default=0, help="the adapters' init and the data order")
    w.add_argument("--prompts", type=int, default=60, help="held-out prompts with the new word")
    w.add_argument("--heldout", type=int, default=180, help="held-out prompts of --score")
    w.add_argument("--sheet", metavar="PNG", help="save 8 new-word images, before and after")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command in ("train", "lora"):
        from plumbing.cli import command_line
        with command_line("toy.py"):
            (train if args.command == "train" else teach_word)(args)
        return
    if args.grid:
        grid(args.grid, size=args.size)
    if args.check or not args.grid:
        check(args.n, args.size)


if __name__ == "__main__":
    main()
