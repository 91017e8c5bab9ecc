"""
The training data: a .jsonl of records (or, for the autoencoder, a folder of images) becomes
deterministic, per-position training samples.

    record    {"path": "img.jpg", "prompt": "a cat"}: a line of the data file (paths relative to it)
    crop      the official aspect bucket closest to the image's aspect, about resolution^2 pixels
    caption   one variant of the prompt (short/middle/long, en/zh), drawn with the paper's ratios,
              or dropped (the empty caption, for guidance)
    position  the sample's place in the data stream; every random choice of a sample is seeded by it

The autoencoder's views: fixed_crop (the fixed-size stages), the aspect buckets (the
multi-resolution stages) and eval_crop (the reconstruction metrics); ImageSet serves the first two.

So a run reads the same samples on any number of GPUs for the same global batch, and a resumed run
continues bit for bit. Optionally the DINOv3 latents and Gemma features of every record are
precomputed into a cache. No torch.distributed and no models here: the encoders are passed
in as functions.

"prompt" may hold caption variants, {"short": .., "middle": .., "long": ..} and/or
{"en": .., "zh": ..}. Optional "system_prompt" (a name from svgt2i.SYSTEM_PROMPTS or a literal).
The official HQ record form {"image_path", "super_high_quality_caption"} gets the "align" prompt.
"""

import array
import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from plumbing.files import IMAGE_SUFFIXES, describe, open_image
from svgt2i import images_to_tensor, system_prompt_text

LENGTHS, LANGUAGES = ("short", "middle", "long"), ("en", "zh")


# -------------------------------------------------------------------------------------------------
# Images: the official aspect-ratio crops


def crop_size_list(num_patches, patch=16, max_ratio=4.0):
    """Crop sizes (w, h) in px of at most `num_patches` patches and aspect at most max_ratio, as
    the official generate_crop_size_list: walk the width down from num_patches patches while the
    height grows as far as the budget allows, i.e. for w patches the heights num_patches // (w + 1)
    .. num_patches // w; a side is kept only if side_px // 32 is even
    (with 16 px patches: n mod 4 is 0 or 1). 256 px -> 15 sizes, 512 -> 27, 1024 -> 51."""
    sizes = []
    for wp in range(num_patches, 0, -1):
        for hp in range(max(1, num_patches // (wp + 1)), num_patches // wp + 1):
            w, h = wp * patch, hp * patch
            even = (w // 32) % 2 == 0 and (h // 32) % 2 == 0
            if max(wp, hp) / min(wp, hp) <= max_ratio and even:
                sizes.append((w, h))
    return sizes


def crops_for(resolution):
    """The crop list of an anchor resolution (crops of about resolution^2 px)."""
    return crop_size_list(round((resolution / 16) ** 2))


def closest_crop(width, height, crops):
    """The crop whose aspect is closest to the image's: largest min(cw/w, ch/h) / max(cw/w, ch/h);
    ties go to the larger (w, h) (the official `var_center_crop` with random_top_k=1)."""
    def kept(c):
        sw, sh = c[0] / width, c[1] / height
        return min(sw, sh) / max(sw, sh)
    return max(crops, key=lambda c: (kept(c), c))


def center_crop(image, size):
    """Box-halve while both sides are at least twice the crop, bicubic-resize so the crop just
    fits, cut the middle."""
    cw, ch = size
    while image.width >= 2 * cw and image.height >= 2 * ch:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(cw / image.width, ch / image.height)
    image = image.resize((round(image.width * scale), round(image.height * scale)),
                         resample=Image.BICUBIC)
    left, top = (image.width - cw) // 2, (image.height - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def load_bucket_crop(path, crops):
    """The training view of an image: [3, h, w] in [-1, 1], cropped to its closest
    aspect bucket."""
    image = open_image(path)
    return images_to_tensor([center_crop(image,
                                         closest_crop(image.width, image.height, crops))])[0]


def _as_tensor(image):
    """PIL RGB -> [1, 3, H, W] float32 with values 0..255."""
    a = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float()


def fixed_crop(image, size, rng):
    """The fixed-size stages' view (upstream: albumentations SmallestMaxSize + RandomCrop, no flip):
    the smaller side resized to `size` (bilinear, half-pixel centres, no antialiasing: cv2's
    INTER_LINEAR, rounded to uint8 as cv2 does), then a size x size crop at an offset drawn
    uniformly from `rng` (a numpy Generator). -> [3, size, size] in [-1, 1]."""
    x = _as_tensor(image)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=False).round().clamp(0, 255)
    top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
    return x[0, :, top:top + size, left:left + size] / 127.5 - 1


def eval_crop(image, size=256):
    """The reconstruction metrics' view (upstream evaluate_tokenizer.py: ToTensor, Resize(size),
    CenterCrop(size)): values in [0, 1], the smaller side resized to `size` and the other to
    int(size * long / short) (torchvision's rule), bilinear with antialiasing (torchvision's tensor
    resize); the centre crop at rounded offsets. -> [3, size, size] in [-1, 1]."""
    x = _as_tensor(image) / 255
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    other = int(size * long / short)
    nh, nw = (size, other) if h <= w else (other, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return x[0, :, top:top + size, left:left + size] * 2 - 1


# -------------------------------------------------------------------------------------------------
# Records and captions


def parse_captions(prompt, where):
    """A record's "prompt" -> {language: {length: caption}}. A plain string is one caption
    ("en", "any")."""
    def lengths(value, lang):
        if value is None or isinstance(value, str):
            return {"any": value or ""}
        if not isinstance(value, dict) or not value or set(value) - set(LENGTHS):
            raise ValueError(f"{where}: prompt[{lang!r}] must be a string or an object with keys "
                             f"among {', '.join(LENGTHS)}")
        if not all(isinstance(v, str) for v in value.values()):
            raise ValueError(f"{where}: caption variants must be strings")
        return dict(value)

    if isinstance(prompt, dict) and prompt and set(prompt) <= set(LANGUAGES):
        return {lang: lengths(v, lang) for lang, v in prompt.items()}
    if isinstance(prompt, dict) and set(prompt) - set(LENGTHS):
        raise ValueError(f"{where}: unknown caption keys {sorted(set(prompt) - set(LENGTHS))}: "
                         f"use {', '.join(LENGTHS)} and/or {', '.join(LANGUAGES)}")
    return {"en": lengths(prompt, "en")}


def parse_record(line, base, where, default_system="base"):
    """One .jsonl line -> {"path", "captions", "system"}; raises ValueError naming the line."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object with \"path\" and \"prompt\"")
    if "super_high_quality_caption" in rec:      # the official HQ form, trained with "align"
        path, prompt, system = rec.get("image_path"), rec["super_high_quality_caption"], "align"
    else:
        path, prompt, system = rec.get("path"), rec.get("prompt"), default_system
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: missing \"path\" (the image file, absolute or relative to the "
                         ".jsonl)")
    system = rec.get("system_prompt", system)
    if not isinstance(system, str):
        raise ValueError(f"{where}: \"system_prompt\" must be a string")
    captions = parse_captions(prompt, where)
    no_prompt = not any(c.strip() for variants in captions.values() for c in variants.values())
    return {"path": os.path.join(base, path), "captions": captions,
            "system": system_prompt_text(system), "no_prompt": no_prompt}


class Records:
    """The .jsonl data file, read by line offsets: 60M records cost 60M offsets, not 60M dicts.
    Records are parsed when used (the first 1000 are checked at start, so a wrong file
    fails at once)."""

    def __init__(self, path, default_system="base"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path} (expected a .jsonl file of "
                                    "{\"path\", \"prompt\"} lines)")
        self.path, self.base = path, os.path.dirname(os.path.abspath(path))
        self.default_system = default_system
        offsets, lines, pos = array.array("q"), array.array("q"), 0  # 8 bytes a record, not an int
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(n)
                pos += len(line)
        if not offsets:
            raise ValueError(f"{path}: no records (expected one JSON object per line)")
        self.offsets = np.frombuffer(offsets, dtype=np.int64)
        self.lines = np.frombuffer(lines, dtype=np.int64)
        self._file, self._pid = None, None
        for i in range(min(len(self), 1000)):
            self[i]

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):     # DataLoader workers open their own handle
        return {**self.__dict__, "_file": None, "_pid": None}

    def where(self, i):
        return f"{self.path}:{self.lines[i]}"

    def __getitem__(self, i):
        if self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        return parse_record(self._file.readline(), self.base, self.where(i), self.default_system)


class ImageFolder:
    """Every image file under a folder, recursively (e.g. an ImageNet train folder), as records
    {"path"} in the order of their relative paths. The paths live in one byte string with
    offsets: a million files cost a few bytes each, not a Python string each."""

    def __init__(self, folder):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder not found: {folder}")
        self.path = folder
        names = sorted(os.path.relpath(os.path.join(root, f), folder)
                       for root, _, files in os.walk(folder, followlinks=True)
                       for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"{folder}: no image files under it (looked for "
                             f"{', '.join(IMAGE_SUFFIXES)})")
        encoded = [n.encode() for n in names]
        self.blob = b"".join(encoded)
        self.offsets = np.cumsum([0] + [len(n) for n in encoded], dtype=np.int64)

    def __len__(self):
        return len(self.offsets) - 1

    def name(self, i):
        return self.blob[self.offsets[i]:self.offsets[i + 1]].decode()

    def where(self, i):
        return os.path.join(self.path, self.name(i))

    def __getitem__(self, i):
        return {"path": self.where(i)}


def open_records(path, default_system="base"):
    """Training images: a folder of images (ImageFolder) or a .jsonl of records (Records)."""
    return ImageFolder(path) if os.path.isdir(path) else Records(path, default_system)


def choose_caption(captions, rng, dropout, length_ratios, zh_ratio):
    """(language, length) of the caption to train on, or None: dropped (the empty string, for CFG).
    Exactly three draws, so the stream never depends on the record."""
    drop, u_lang, u_len = rng.random(), rng.random(), rng.random()
    if drop < dropout:
        return None
    lang = "zh" if u_lang < zh_ratio else "en"
    if lang not in captions:
        lang = next(iter(captions))
    options = list(captions[lang])
    weights = [length_ratios[LENGTHS.index(k)] if k in LENGTHS else 1.0 for k in options]
    if sum(weights) <= 0:       # only lengths this stage never draws: use what the record has
        weights = [1.0] * len(options)
    u, total = u_len * sum(weights), 0.0
    for k, w in zip(options, weights):
        total += w
        if u < total:
            return lang, k
    return lang, options[-1]


def caption_text(record, choice):
    """The text Gemma encodes: system prompt + caption, a caption of only whitespace counting as
    empty; a dropped caption is "" without system prompt (both as upstream)."""
    if choice is None:
        return ""
    caption = record["captions"][choice[0]][choice[1]]
    return record["system"] + (caption if caption.strip() else "")


def caption_texts(record):
    """Every (variant, text) of a record: what the cache encodes."""
    return [((lang, k), caption_text(record, (lang, k))) for lang in record["captions"]
            for k in record["captions"][lang]]


# -------------------------------------------------------------------------------------------------
# The data stream: global positions -> records, every random choice seeded by the position


def sample_seeds(seed, resolution, position):
    """Two independent 63-bit seeds (captions, t + noise) for the sample at `position` of the
    data stream."""
    a, b = np.random.SeedSequence([seed, resolution, position]).generate_state(2, np.uint64)
    return int(a) >> 1, int(b) >> 1


class Positions(torch.utils.data.Sampler):
    """The (position, record index) pairs this rank reads. Step s covers global positions
    [start + s G, start + (s + 1) G); rank r takes the r-th contiguous slice of G / W. Position p
    is record perm_e[p mod N] of epoch e = p // N, with a permutation seeded by
    (seed, resolution, e)."""

    def __init__(self, n_records, seed, resolution, start, steps, global_batch, rank, world):
        self.n, self.seed, self.resolution, self.start = n_records, seed, resolution, start
        self.steps, self.global_batch, self.rank, self.world = steps, global_batch, rank, world
        self._epoch, self._perm = None, None

    def index(self, position):
        epoch, k = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.resolution,
                                                epoch]).permutation(self.n)
        return int(self._perm[k])

    def __len__(self):
        return self.steps * (self.global_batch // self.world)

    def __iter__(self):
        local = self.global_batch // self.world
        for s in range(self.steps):
            first = self.start + s * self.global_batch + self.rank * local
            for p in range(first, first + local):
                yield p, self.index(p)


def first_readable(records, index, load, tries=64):
    """(i, load(i), skipped) for the first record from `index` on (wrapping around) that load()
    reads; skipped lists the (record, reason) pairs passed over, so the trainer can warn and count.
    Any decoding error of any image library counts as unreadable; `tries` in a row is an error."""
    skipped = []
    for k in range(tries):
        i = (index + k) % len(records)
        try:
            return i, load(i), skipped
        except Exception as e:
            skipped.append((i, describe(e)))
    raise ValueError(f"{records.path}: {tries} records in a row from {records.where(index)} "
                     f"could not be read (last: {skipped[-1][1]})")


class TrainSet(torch.utils.data.Dataset):
    """Item (position, index) -> one training sample: the image
    (or, with a cache, its latent and caption features), the caption text and the seed of its t and
    noise. An unreadable image (or record) is replaced by the next record of the file; what was
    skipped comes back in the item, so the trainer can warn and count."""

    MAX_TRIES = 64

    def __init__(self, records, crops, seed, resolution, caption_dropout, caption_ratios, zh_ratio,
                 cache=None):
        self.records, self.crops, self.cache = records, crops, cache
        self.seed, self.resolution = seed, resolution
        self.dropout, self.ratios, self.zh_ratio = caption_dropout, caption_ratios, zh_ratio

    def __len__(self):
        return len(self.records)

    def load(self, index):
        """(record, image [3, h, w] in [-1, 1]) or, with a cache, (record, cached tensors)."""
        record = self.records[index]
        try:
            if self.cache is not None:
                return record, self.cache.read(index)
            return record, load_bucket_crop(record["path"], self.crops)
        except Exception as e:
            raise ValueError(f"{record['path']}: {describe(e)}") from None

    def __getitem__(self, item):
        position, index = item
        caption_seed, noise_seed = sample_seeds(self.seed, self.resolution, position)
        i, (record, data), skipped = first_readable(self.records, index, self.load, self.MAX_TRIES)
        choice = choose_caption(record["captions"], random.Random(caption_seed), self.dropout,
                                self.ratios, self.zh_ratio)
        out = {"position": position, "index": i, "noise_seed": noise_seed, "skipped": skipped,
               "text": caption_text(record, choice), "no_prompt": record["no_prompt"]}
        if self.cache is None:
            out["image"] = data
        else:
            out["latent"] = data["latent"]
            key = None if choice is None else self.cache.text_key(choice)
            out["text_feats"] = self.cache.empty if key is None else data[key]
        return out


class ImageSet(torch.utils.data.Dataset):
    """The autoencoder's training images. Item (position, index) -> {"position", "index",
    "image" [3, h, w] in [-1, 1], "skipped"}. crops="fixed": fixed_crop at `resolution`, its offset
    drawn from the position's seed; crops="buckets": the aspect bucket crop of load_bucket_crop. An
    unreadable image is replaced by the next record (first_readable)."""

    MAX_TRIES = 64

    def __init__(self, records, crops, resolution, seed):
        self.records, self.crops, self.resolution, self.seed = records, crops, resolution, seed
        self.buckets = crops_for(resolution) if crops == "buckets" else None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        position, index = item
        rng = np.random.default_rng(sample_seeds(self.seed, self.resolution, position)[0])

        def load(i):
            path = self.records[i]["path"]
            try:
                if self.buckets is not None:
                    return load_bucket_crop(path, self.buckets)
                return fixed_crop(open_image(path), self.resolution, rng)
            except Exception as e:
                raise ValueError(f"{path}: {describe(e)}") from None
        i, image, skipped = first_readable(self.records, index, load, self.MAX_TRIES)
        return {"position": position, "index": i, "image": image, "skipped": skipped}


def collate(items):
    """A micro-batch stays a list: its images have different sizes (one aspect bucket each)."""
    return items
