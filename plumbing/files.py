"""
Reading and writing files, each failure one line that names the file: the one checkpoint reader
(safetensors; torch files memory-mapped and weights_only; Hugging Face folders), JSON objects, image
files of every mode as 8-bit RGB, and the one atomic writer (a file or folder is whole or absent).

You need not read this to learn SVG-T2I.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from plumbing import UsageError


def first_line(e):
    """An exception's message, its first line (at most 200 characters), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def describe(e):
    """An exception as one short line: `Type: first line of the message`."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def listing(names, n=8):
    """The one key-list formatter of our error messages: the first n names, and how many more."""
    names = list(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def key_mismatch(expected, sd, prefix="", missing=()):
    """What keeps the state dict `sd` from loading strictly into a model whose state dict is
    `expected`, as one phrase under the file's names (`prefix` added; `missing`: keys a key map
    could not find), or "" when it fits."""
    missing = [prefix + k for k in missing] + [prefix + k for k in expected if k not in sd]
    unexpected = [prefix + k for k in sd if k not in expected]
    misshaped = [f"{prefix}{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in sd.items()
                 if k in expected and v.shape != expected[k].shape]
    problems = (("missing", missing), ("unexpected", unexpected),
                ("wrong shape (file vs model)", misshaped))
    return "; ".join(f"{what}: {listing(names)}" for what, names in problems if names)


def read_json(path):
    """A JSON file; invalid JSON is a one-line ValueError naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def json_object(text, flag, example):
    """The one parser of a JSON-object flag (--model-config, --decoder-config, ...): {} for None,
    else the object, or a UsageError showing `example`."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise UsageError(f"{flag}: a JSON object of {example}")
    return obj


# -------------------------------------------------------------------------------------------------
# Checkpoints: {name: tensor} of any file we read, without copying it

def read_torch(path):
    """torch.load, memory-mapped and weights_only; a legacy (non-zip) file is read whole."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        error = e
    if "_use_new_zipfile_serialization" in str(error):  # not a zip: legacy torch.save, or not torch
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            error = e
    refused = refused_global(error)
    if refused:   # a checkpoint that pickles Python objects next to its tensors: never run those
        raise ValueError(f"{path} holds Python objects besides tensors (torch refused {refused}); "
                         "if you trust the file, re-save only its weights: torch.save(torch.load("
                         "path, weights_only=False)['state_dict'], 'weights.pth')") from None
    zip_error = str(error).split(". ")[0] if "PytorchStreamReader" in str(error) else ""
    detail = f" ({zip_error})" if zip_error else ""
    raise ValueError(f"{path}: cannot read checkpoint: not a torch checkpoint, or corrupt or "
                     f"truncated{detail}") from None


def refused_global(error):
    """What a weights_only torch.load refused, e.g. "GLOBAL posix.system", or None when `error` is
    no such refusal. torch words it differently across versions and causes ("Unsupported global:
    GLOBAL a.B was not an allowed global", "Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked"), so the match ignores case and wording around the name."""
    found = re.search(r"unsupported global:?\s*(?:global\s+)?([\w.]+)", str(error), re.I)
    return f"GLOBAL {found.group(1)}" if found else None


def read_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path)          # memory-mapped: tensors stay in the page cache until cast
    except Exception as e:
        raise ValueError(f"{path}: cannot read checkpoint: not a safetensors file, or corrupt or "
                         f"truncated ({first_line(e)})") from None


def read_hf_folder(folder):
    """A Hugging Face folder: model.safetensors, or the shards its
    model.safetensors.index.json lists."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        single = os.path.join(folder, "model.safetensors")
        if not os.path.isfile(single):
            raise FileNotFoundError(f"{folder}: no model.safetensors.index.json or "
                                    "model.safetensors (expected a Hugging Face checkpoint "
                                    "folder)")
        return read_safetensors(single)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: "
                         f"{e})") from None
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        raise FileNotFoundError(f"{folder}: shards listed in model.safetensors.index.json are "
                                f"missing: {absent}")
    sd = {}
    for shard in shards:
        part = read_safetensors(os.path.join(folder, shard))
        listed = sorted(k for k, s in weight_map.items() if s == shard and k not in part)
        if listed:
            raise ValueError(f"{os.path.join(folder, shard)}: keys listed for it in "
                             f"model.safetensors.index.json are absent: {listed[:8]} "
                             f"({len(listed)})")
        sd.update(part)
    return sd


def read_state_dict(path):
    """The one file reader: {name: tensor} of a checkpoint, without copying it. A .safetensors
    file, a torch file (.pth, .pt, .ckpt: memory-mapped, weights_only) or a Hugging Face folder
    (model.safetensors or its sharded index). The trainers' {"model": ...} / {"ema": ...} ("model"
    first: what the official sampler's --direct_ckpt path loads) and Lightning's
    {"state_dict": ...} are unwrapped. Every failure is one line naming the file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_hf_folder(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = read_safetensors(path) if path.endswith(".safetensors") else read_torch(path)
    while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in ("model", "ema", "state_dict")
                      if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor: "
                         "not a weights file (a state dict of tensors)")
    return obj


def sub_state_dict(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# -------------------------------------------------------------------------------------------------
# Images: every image file is read as training reads it (to_rgb)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


def to_rgb(image):
    """8-bit RGB. Transparency is composited on white (upstream does this for RGBA and converts
    P/L). One-channel images of more than 8 bits are scaled from the range their data is in (PIL's
    own conversion clips them at 255, so a 16-bit scan turns white): 'I;16*' from 0..65535, 'I'
    from 0..65535 (0..255 if no value exceeds 255), 'F' from 0..1 (0..255 if a value exceeds 1).
    CMYK, YCbCr, 1-bit, grey and palette images go through PIL's conversion."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        top = a.max(initial=0)
        if image.mode == "F":
            scale = 1.0 if top <= 1 else 255.0
        else:
            scale = 255.0 if image.mode == "I" and top <= 255 else 65535.0
        grey = np.clip(np.round(a * (255.0 / scale)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def open_image(path, mode="RGB"):
    """The one image reader: a file decoded in full (so a truncated or corrupt file fails here,
    with PIL's own error), as 8-bit RGB by to_rgb, or another `mode` by PIL's conversion (masks:
    "L"). The data sets call it and report a failure as a skipped record."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im) if mode == "RGB" else im.convert(mode)


def read_image(path, mode="RGB"):
    """open_image for a file the user named: a missing, unreadable or too large file is a one-line
    error (the data sets skip such a file instead)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return open_image(path, mode)
    except Image.DecompressionBombError as e:   # PIL refuses more than 2 * MAX_IMAGE_PIXELS
        raise ValueError(f"{path}: too large to read: {first_line(e).split(',')[0]}; "
                         "downscale it first") from None
    except (OSError, SyntaxError) as e:         # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not an image ({first_line(e)})") from None


def read_images(folder):
    """The images of a folder (by suffix: IMAGE_SUFFIXES), sorted by name: [(path, RGB image)]."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"{folder}: no images in it ({', '.join(IMAGE_SUFFIXES)})")
    return [(p, read_image(p)) for p in paths]


# -------------------------------------------------------------------------------------------------
# Writing: one atomic writer, for files and folders
_UMASK = os.umask(0)      # the only way to read the umask is to set it: put it straight back
os.umask(_UMASK)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write(path, write):
    """Write `path`, a file or a folder, so that it is whole or absent even if the process dies
    midway: write(tmp) writes it under a temporary name in the same folder (same suffix), which is
    fsynced and then renamed over `path`. Files get the umask's mode (safetensors writes 0600).
    Returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")
    _remove(tmp)
    try:
        write(tmp)
        for f in ([*tmp.iterdir(), tmp] if tmp.is_dir() else [tmp]):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~_UMASK)
            _fsync(f)
        if path.is_dir():       # a folder cannot be renamed over another: move the old one away
            old = path.with_name(f".old{os.getpid()}-{path.name}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        _remove(tmp)
    return path
