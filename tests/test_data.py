"""data.py: the official crop list and crops, caption sampling with the paper's ratios, the record forms, and
the data stream's independence of the world size."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from plumbing import files
import data
import svgt2i


@pytest.mark.parametrize("resolution, count, first, last", [(256, 15, (512, 128), (128, 512)),
                                                           (512, 27, (1024, 256), (256, 1024)),
                                                           (1024, 51, (2048, 512), (512, 2048))])
def test_crop_size_list_matches_the_official_list(resolution, count, first, last):
    crops = data.crop_size_list(round((resolution / 16) ** 2))
    assert len(crops) == count and crops[0] == first and crops[-1] == last
    assert (resolution, resolution) in crops
    tokens = [w * h // 256 for w, h in crops]
    assert max(tokens) == (resolution // 16) ** 2 and min(tokens) >= 0.85 * max(tokens)
    if resolution == 1024:
        assert min(tokens) == 3960                                       # the reference's 3960-4096
    assert all(w % 64 in (0, 16) and h % 64 in (0, 16) for w, h in crops)      # sides of 0 or 1 mod 4 patches


def test_closest_crop_and_center_crop():
    crops = data.crop_size_list(64)                     # 128 px: 9 sizes
    assert data.closest_crop(240, 100, crops) == (192, 80)   # aspect 2.4 exactly
    assert data.closest_crop(100, 240, crops) == (80, 192)
    assert data.closest_crop(500, 510, crops) == (128, 128)
    assert data.closest_crop(2000, 100, crops) == (256, 64)  # beyond 4:1 -> the widest
    im = Image.new("RGB", (1200, 417), (255, 0, 0))       # wider than 192:80, so the sides are cut
    im.paste((0, 0, 255), (0, 0, 30, 417))                # a blue strip on the left edge is cropped away
    out = data.center_crop(im, (192, 80))
    assert out.size == (192, 80) and out.getpixel((0, 40)) == (255, 0, 0)


def test_caption_sampling_follows_the_paper_ratios():
    caps = {"en": {"short": "s", "middle": "m", "long": "l"}, "zh": {"short": "zs", "middle": "zm", "long": "zl"}}
    rng, n = random.Random(0), 40000
    picks = [data.choose_caption(caps, rng, 0.1, (0.10, 0.35, 0.55), 0.2) for _ in range(n)]
    kept = [p for p in picks if p is not None]
    assert abs(1 - len(kept) / n - 0.1) < 0.01                                   # caption dropout
    assert abs(sum(p[0] == "zh" for p in kept) / len(kept) - 0.2) < 0.01          # language
    for k, r in zip(data.LENGTHS, (0.10, 0.35, 0.55)):
        assert abs(sum(p[1] == k for p in kept) / len(kept) - r) < 0.01          # length
    # stage 4: long only; a record without the drawn language / length falls back to what it has
    assert {data.choose_caption(caps, rng, 0, (0, 0, 1), 0.2)[1] for _ in range(200)} == {"long"}
    only_short = {"en": {"short": "s"}}
    assert {data.choose_caption(only_short, rng, 0, (0, 0, 1), 0.5) for _ in range(50)} == {("en", "short")}
    assert data.caption_text({"system": "S: ", "captions": caps}, ("zh", "long")) == "S: zl"
    assert data.caption_text({"system": "S: ", "captions": caps}, None) == ""    # dropped: no system prompt


def test_record_forms(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"path": "a.png", "prompt": "a cat"}\n\n'
                 '{"path": "/abs/b.png", "prompt": {"en": {"short": "s", "long": "l"}, "zh": "z"}, "system_prompt": "real"}\n'
                 '{"image_path": "c.png", "super_high_quality_caption": "hq"}\n')
    r = data.Records(str(p))
    assert len(r) == 3 and list(r.lines) == [1, 3, 4]
    assert r[0]["path"] == str(tmp_path / "a.png") and r[0]["captions"] == {"en": {"any": "a cat"}}
    assert r[0]["system"] == svgt2i.SYSTEM_PROMPTS["base"]
    assert r[1]["path"] == "/abs/b.png" and r[1]["captions"]["zh"] == {"any": "z"}
    assert r[1]["system"] == svgt2i.SYSTEM_PROMPTS["real"]
    assert r[2]["system"] == svgt2i.SYSTEM_PROMPTS["align"] and r[2]["captions"]["en"]["any"] == "hq"


def test_data_stream_is_independent_of_world_size():
    one = list(data.Positions(10, 3, 256, 0, 4, 6, 0, 1))
    two = [list(data.Positions(10, 3, 256, 0, 4, 6, r, 2)) for r in (0, 1)]
    merged = [p for s in range(4) for r in (0, 1) for p in two[r][3 * s:3 * s + 3]]
    assert merged == one and [p for p, _ in one] == list(range(24))
    assert sorted(i for _, i in one[:10]) == list(range(10))        # an epoch is a permutation
    later = list(data.Positions(10, 3, 256, 12, 2, 6, 0, 1))        # resumed after 2 steps
    assert later == one[12:]


# ---------------------------------------------------------------------------------------------------------------
# Image modes, the autoencoder's views, image folders


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.uint16)), [0, 255, 128]),     # I;16: /257
    (lambda: Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32)), [0, 4, 255]),        # I, 16-bit data
    (lambda: Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32)), [0, 100, 255]),         # I, 8-bit data
    (lambda: Image.fromarray(np.array([[0, 0.5, 1.0]], dtype=np.float32)), [0, 128, 255]),       # F in [0, 1]
    (lambda: Image.fromarray(np.array([[0, 100, 200]], dtype=np.float32)), [0, 100, 200]),       # F in 0..255
])
def test_to_rgb_scales_deep_grey_images_by_their_range(make, expected):
    im = make()
    assert im.mode in ("I;16", "I", "F")
    out = files.to_rgb(im)
    assert out.mode == "RGB" and [out.getpixel((x, 0)) for x in range(3)] == [(v, v, v) for v in expected]


def test_sampling_reads_an_image_file_as_training_does(tmp_path):
    """sample.py's init images and --reconstruct (files.read_image) and the trainers' data sets (data.py's
    open_image) read a 16-bit grey scan and a transparent image the same, by to_rgb."""
    deep, clear = tmp_path / "deep.png", tmp_path / "clear.png"
    Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.uint16)).save(deep)
    Image.new("RGBA", (2, 1), (200, 10, 10, 0)).save(clear)
    for f, expected in ((deep, [(0, 0, 0), (255, 255, 255), (128, 128, 128)]), (clear, [(255, 255, 255)] * 2)):
        a, b = files.read_image(str(f)), data.open_image(str(f))
        assert [a.getpixel((x, 0)) for x in range(a.width)] == expected == [b.getpixel((x, 0)) for x in range(b.width)]
    assert files.read_image(str(clear), "L").mode == "L"             # masks keep PIL's conversion


def test_pil_alone_clips_deep_grey_images():      # why to_rgb scales them itself
    assert Image.fromarray(np.array([[32768]], dtype=np.uint16)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    assert Image.fromarray(np.array([[0.5]], dtype=np.float32)).convert("RGB").getpixel((0, 0)) == (0, 0, 0)


def test_to_rgb_composites_transparency_on_white_and_converts_the_rest():
    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))                      # pure cyan ink
    assert files.to_rgb(cmyk).getpixel((0, 0)) == (0, 255, 255)
    rgba = Image.new("RGBA", (2, 1), (200, 10, 10, 255))
    rgba.putpixel((1, 0), (200, 10, 10, 0))
    assert [files.to_rgb(rgba).getpixel((x, 0)) for x in range(2)] == [(200, 10, 10), (255, 255, 255)]
    la = Image.new("LA", (1, 1), (30, 0))
    assert files.to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (1, 1), 0)
    p.info["transparency"] = 0
    assert files.to_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    assert files.to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert files.to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_fixed_crop_resizes_the_smaller_side_and_crops_at_a_drawn_offset():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))           # 64 wide, 40 high
    out = data.fixed_crop(im, 32, np.random.default_rng(5))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float()
    resized = F.interpolate(x, size=(32, 51), mode="bilinear", align_corners=False).round()   # 64 * 32/40 = 51.2
    g = np.random.default_rng(5)
    top, left = int(g.integers(0, 1)), int(g.integers(0, 51 - 32 + 1))
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, resized[0, :, top:top + 32, left:left + 32] / 127.5 - 1, rtol=0, atol=0)
    same = data.fixed_crop(Image.fromarray(np.asarray(im)[:32, :32]), 32, np.random.default_rng(1))
    torch.testing.assert_close(same, x[0, :, :32, :32] / 127.5 - 1, rtol=0, atol=0)     # the right size: as is


@pytest.mark.parametrize("w, h, resized, offset", [(300, 200, (256, 384), (0, 64)), (200, 330, (422, 256), (83, 0)),
                                                   (256, 256, (256, 256), (0, 0))])
def test_eval_crop_follows_torchvision_resize_and_center_crop(w, h, resized, offset):
    im = Image.fromarray(np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 255
    if resized != (h, w):   # Resize(256): smaller side 256, the other int(256 * long / short); bilinear, antialiased
        x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False, antialias=True)
    top, left = offset      # CenterCrop(256): offsets round((size - 256) / 2)
    expected = x[0, :, top:top + 256, left:left + 256] * 2 - 1
    torch.testing.assert_close(data.eval_crop(im), expected, rtol=0, atol=0)


def test_image_folder_is_recursive_sorted_and_skips_other_files(tmp_path):
    for rel in ["b/2.png", "a/z/1.JPEG", "a/0.webp", "c.txt", "b/notes.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    f = data.ImageFolder(str(tmp_path))
    assert len(f) == 3 and [f.name(i) for i in range(3)] == ["a/0.webp", "a/z/1.JPEG", "b/2.png"]
    assert f[1] == {"path": str(tmp_path / "a/z/1.JPEG")} and f.where(2) == str(tmp_path / "b/2.png")
    assert isinstance(data.open_records(str(tmp_path)), data.ImageFolder)
    (tmp_path / "paths.jsonl").write_text('{"path": "b/2.png"}\n')               # a .jsonl of paths only
    r = data.open_records(str(tmp_path / "paths.jsonl"))
    assert isinstance(r, data.Records) and r[0]["path"] == str(tmp_path / "b/2.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        data.ImageFolder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="3 records in a row"):                 # nothing readable: an error
        data.first_readable(f, 0, lambda i: data.open_image(f[i]["path"]), tries=3)
