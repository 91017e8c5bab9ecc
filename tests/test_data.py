"""data.py: the official crop list and crops, caption sampling with the paper's ratios, the record forms, and
the data stream's independence of the world size."""

import random

import pytest
from PIL import Image

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
