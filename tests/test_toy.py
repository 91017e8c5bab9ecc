"""The shapes world: determinism, captions, layouts, the analyser's accuracy (GenEval in miniature), and toy.py's
command line."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

import toy


# ---------------------------------------------------------------------------------------------- data and captions

def test_dataset_is_deterministic_and_prefix_stable():
    a = toy.make_dataset(6, 64, seed=3)
    b = toy.make_dataset(6, 64, seed=3)
    assert [c for _, c in a] == [c for _, c in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    # item i depends only on (seed, i): a shorter data set is a prefix of a longer one
    short = toy.make_dataset(3, 64, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(short, a))
    # another seed gives other images
    other = toy.make_dataset(6, 64, seed=4)
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(other, a))
    im, _ = a[0]
    assert im.mode == "RGB" and im.size == (64, 64)


def test_captions_vocabulary_and_round_trip():
    assert len(toy.CAPTIONS) == len(set(toy.CAPTIONS)) == 3 * 4 * 3 * 5 == 180
    assert len(toy.WORDS) == 22
    for scene in toy.all_scenes():
        assert toy.parse_caption(toy.caption(scene)) == scene
    assert toy.caption(toy.Scene(2, "red", "circle", "left")) == "two red circles on the left"
    assert toy.caption(toy.Scene(1, "blue", "square", "top")) == "one blue square at the top"
    assert toy.caption(toy.Scene(3, "yellow", "triangle", "centre")) == "three yellow triangles in the centre"
    # lenient about case, digits, spelling and punctuation
    assert toy.parse_caption("Three GREEN triangles in the center.") == toy.Scene(3, "green", "triangle", "centre")
    assert toy.parse_caption("2 blue squares, at the bottom") == toy.Scene(2, "blue", "square", "bottom")


@pytest.mark.parametrize("text, problem", [
    ("two circles on the left", "no colour"),
    ("two red blue circles on the left", "several"),
    ("red circles on the left", "no count"),
    ("two red hexagons on the left", "no shape"),
    ("two red circles", "no position"),
])
def test_parse_caption_errors(text, problem):
    with pytest.raises(ValueError, match=problem):
        toy.parse_caption(text)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="colour"):
        toy.Scene(1, "purple", "circle", "left")
    with pytest.raises(ValueError, match="count"):
        toy.Scene(4, "red", "circle", "left")
    with pytest.raises(ValueError, match="at least 32"):
        toy.render(toy.Scene(1, "red", "circle", "left"), 16, 0)
    with pytest.raises(ValueError, match="shape"):
        toy.analyse(np.zeros((8, 8)))


def test_sample_scene_covers_the_world_and_heldout_prompts_are_balanced():
    rng = np.random.default_rng(0)
    scenes = [toy.sample_scene(rng) for _ in range(3000)]
    assert len(set(scenes)) == 180
    prompts = toy.heldout_prompts(400)
    assert sorted(prompts[:180]) == sorted(toy.CAPTIONS) and sorted(prompts[180:360]) == sorted(toy.CAPTIONS)
    assert prompts == toy.heldout_prompts(400)


def test_layouts_are_inside_apart_and_clearly_placed():
    # every scene, several seeds: shapes inside the image, non-overlapping, and the group where the caption says
    for k, scene in enumerate(toy.all_scenes()):
        for seed in range(3):
            x, y, d = toy._layout(scene, np.random.default_rng([k, seed]))
            assert len(x) == scene.count
            assert np.all(d >= toy.SIZE_RANGE[0] * 0.95) and np.all(d <= toy.SIZE_RANGE[1] * 1.05)
            assert np.all(np.minimum(x, y) - d / 2 >= toy.EDGE) and np.all(np.maximum(x, y) + d / 2 <= 1 - toy.EDGE)
            for i in range(scene.count):
                for j in range(i):
                    assert max(abs(x[i] - x[j]), abs(y[i] - y[j])) >= (d[i] + d[j]) / 2 + toy.GAP
            assert toy.position_of(x.mean(), y.mean()) == scene.position


def test_render_pixels():
    scene = toy.Scene(2, "green", "square", "right")
    im = np.asarray(toy.render(scene, 128, 5)).reshape(-1, 3)
    colours = {tuple(c) for c in im}
    assert toy.BACKGROUND in colours and toy.COLOURS["green"] in colours
    assert not any(toy.COLOURS[c] in colours for c in ("red", "blue", "yellow"))
    # the corners are background and the left half is empty: the shapes are on the right
    assert np.all(np.asarray(toy.render(scene, 128, 5))[:, :64] == toy.BACKGROUND)


def test_position_rule():
    assert toy.position_of(0.5, 0.5) == "centre"
    assert toy.position_of(0.2, 0.45) == "left" and toy.position_of(0.8, 0.6) == "right"
    assert toy.position_of(0.45, 0.2) == "top" and toy.position_of(0.6, 0.8) == "bottom"
    assert toy.position_of(0.6, 0.4) == "centre" and toy.position_of(0.66, 0.5) == "right"


# ---------------------------------------------------------------------------------------------- the analyser

def _accuracy(data, transform=lambda im: im):
    return toy.summarise([toy.score(transform(im), cap) for im, cap in data])


@pytest.mark.parametrize("size, n", [(64, 300), (128, 150)])
def test_analyser_on_ground_truth(size, n):
    acc = _accuracy(toy.make_dataset(n, size, toy.HELDOUT_SEED))
    assert all(acc[k] >= 0.98 for k in toy.CATEGORIES), acc


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("blur, noise", [(1.0, 0.05), (1.5, 0.08)])
def test_analyser_on_degraded_renders(size, blur, noise):
    rng = np.random.default_rng(0)
    acc = _accuracy(toy.make_dataset(120, size, toy.HELDOUT_SEED + 1), lambda im: toy.degrade(im, rng, blur, noise))
    assert acc["overall"] >= 0.97, acc


def test_analyser_on_off_colour_renders():
    # generated shapes are a bit desaturated and off-hue: mix with grey and swap to a neighbouring hue
    def off(im):
        a = np.asarray(im, dtype=np.float32)
        a = 0.65 * a + 0.35 * np.array(toy.BACKGROUND, dtype=np.float32)  # desaturate towards the background
        a = a @ np.array([[0.9, 0.1, 0.0], [0.0, 0.9, 0.1], [0.1, 0.0, 0.9]], dtype=np.float32)  # hue shift
        return Image.fromarray(a.clip(0, 255).astype(np.uint8))
    acc = _accuracy(toy.make_dataset(120, 64, toy.HELDOUT_SEED + 2), off)
    assert acc["overall"] >= 0.97, acc


@pytest.mark.parametrize("category", ["count", "colour", "shape", "position"])
def test_wrong_captions_fail(category):
    rng = np.random.default_rng(1)
    results = []
    for im, cap in toy.make_dataset(100, 64, toy.HELDOUT_SEED):
        wrong = toy.wrong_caption(toy.parse_caption(cap), category, rng)
        assert wrong != cap
        s = toy.score(im, wrong)
        results.append(not s[category] and not s["overall"])
        others = [k for k in ("count", "colour", "shape", "position") if k != category]
        assert all(s[k] for k in others) or not toy.score(im, cap)["overall"]
    assert np.mean(results) >= 0.98


def test_analyser_on_hand_drawn_shapes():
    # an independent drawing (no supersampling, not via render's layout) read back as a whole scene
    im = Image.new("RGB", (128, 128), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.polygon([(20, 18), (38, 46), (2, 46)], fill=(200, 40, 60))  # triangles, left column
    draw.polygon([(20, 78), (38, 106), (2, 106)], fill=(200, 40, 60))
    det = toy.analyse(im)
    assert (det.count, det.colour, det.shape, det.position) == (2, "red", "triangle", "left")
    assert toy.score(im, "two red triangles on the left")["overall"]
    assert toy.score(np.asarray(im), "two red triangles on the left")["overall"]  # arrays work too
    assert toy.score(np.asarray(im) / 255.0, "two red triangles on the left")["overall"]

    im = Image.new("RGB", (64, 64), (230, 230, 230))
    draw = ImageDraw.Draw(im)
    draw.ellipse([24, 24, 40, 40], fill=(250, 210, 0))
    det = toy.analyse(im)
    assert (det.count, det.colour, det.shape, det.position) == (1, "yellow", "circle", "centre")

    im = Image.new("RGB", (64, 64), (240, 240, 240))
    draw = ImageDraw.Draw(im)
    for x in (6, 26, 46):
        draw.rectangle([x, 46, x + 12, 58], fill=(20, 60, 230))
    det = toy.analyse(im)
    assert (det.count, det.colour, det.shape, det.position) == (3, "blue", "square", "bottom")
    # a faint bridge (chroma 0.35: above CHROMA_MIN, below half the squares') does not merge two shapes
    draw.rectangle([19, 51, 25, 52], fill=(150, 170, 240))
    assert toy.analyse(im).count == 3


def test_analyser_ignores_specks_and_blank_images():
    blank = Image.new("RGB", (128, 128), toy.BACKGROUND)
    det = toy.analyse(blank)
    assert det.count == 0 and det.blobs == []
    assert toy.score(blank, "one red circle in the centre") == dict.fromkeys(toy.CATEGORIES, False)
    draw = ImageDraw.Draw(blank)
    for x in range(10, 120, 20):
        draw.rectangle([x, 10, x + 3, 13], fill=(220, 30, 30))  # 16-pixel specks, under AREA_MIN
    assert toy.analyse(blank).count == 0


def test_command_line_keeps_its_flags_and_imports_no_torch():
    """`python toy.py --check` / `--grid PNG` as before, `python toy.py train` with the former `train.py --toy`
    defaults; importing toy.py (sample.py --score does) loads neither torch nor a trainer."""
    import os
    import subprocess
    import sys
    code = "import sys, toy; print(sorted(m for m in ('torch', 'train', 'train_autoencoder') if m in sys.modules))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    a = toy.parse_args(["--check", "--n", "10"])
    assert (a.command, a.check, a.n, a.grid) == (None, True, 10, None)
    assert toy.parse_args(["--grid", "x.png"]).grid == "x.png"
    t = toy.parse_args(["train"])
    assert (t.out, t.images, t.decoder_steps, t.bundle, t.resume, t.seed, t.threads) == \
        ("runs/toy", 6000, 2000, None, False, 0, None)
    assert (t.steps, t.global_batch, t.lr, t.ema_decay) == (None, None, None, None)   # train.py's toy recipe
