"""
Where the weights are: the one place that knows the file names of the official release and of our
own checkpoints, and that finds a part from a flag, a folder, a run's record (run.json) or the
release beside the command. Every miss is one line naming what was expected and where it is
published.

You need not read this to learn SVG-T2I.
"""

import glob
import json
import os
from pathlib import Path

from plumbing import UsageError

DOWNLOAD_HINT = ("the official weights are published with the SVG-T2I release "
                 "(github.com/KlingTeam/SVG-T2I, 'pre-trained/' folder) and Gemma-2-2B at "
                 "huggingface.co/google/gemma-2-2b")

# Where the release is looked for when no folder is named: the official layout beside the command.
RELEASE_DIRS, GEMMA_DIRS = ("pre-trained",), ("gemma-2-2b", "pre-trained/gemma-2-2b")
# The bundled toy model (sample.py --toy); its sampling defaults are in its run.json.
TOY_BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "toy")

# In an official DiT folder the trainer writes both; the EMA weights are preferred (what the
# official sampler's --ema asks for, though its code then loads the other file).
NEXTDIT_FILES = ("consolidated_ema.00-of-01.pth", "consolidated.00-of-01.pth")
# Every part's file names (glob patterns in a checkpoint folder), most preferred first: our own
# training checkpoints and bundles, then the official `pre-trained/` layout.
FILES = {
    "dit": ("ema.safetensors", "model.safetensors", *NEXTDIT_FILES,
            *(f"dit-*/{name}" for name in NEXTDIT_FILES)),
    "autoencoder": ("autoencoder.safetensors", "autoencoder/svg_autoencoder-P-*.ckpt",
                    "autoencoder/svg_autoencoder*.ckpt", "autoencoder/*.ckpt"),
    "dinov3": ("dinov3.safetensors", "dinov3_vits16plus_pretrain_lvd1689m-*.pth"),
    "stats": ("latent_stats.pt", "dinov3_s16p_layer_patchtoken_stats_dist.pt"),
    "gemma": ("text_encoder", "gemma-2-2b"),
}
EXPECTED = {    # what an error message says is missing
    "dit": "dit-*/consolidated.00-of-01.pth (or ema.safetensors / model.safetensors of a "
           "training run)",
    "autoencoder": "autoencoder/svg_autoencoder-P-stage3.ckpt",
    "dinov3": "dinov3_vits16plus_pretrain_lvd1689m-*.pth (or encoder.* keys in the "
              "autoencoder checkpoint)",
    "stats": "dinov3_s16p_layer_patchtoken_stats_dist.pt",
    "gemma": "a Gemma-2-2B folder (config.json, model*.safetensors, tokenizer.model), passed "
             "as --gemma",
}
FROZEN = ("autoencoder", "dinov3", "gemma")    # the frozen parts a DiT run records

# What a training checkpoint folder of ours holds; --resume checks each before trusting it ("a|b":
# either). train.py: full safetensors in every mode (what sample.py and --init-from read), then
# optimizer.pt (ddp) or dcp/ (fsdp: torch.distributed.checkpoint); either resumes in either mode.
# train.py --lora writes the adapters instead of the model: LORA_FILE (their EMA, the file to sample
# with) and LORA_TRAIN_FILE (as trained, for --resume).
LORA_FILE, LORA_TRAIN_FILE = "lora.safetensors", "lora_train.safetensors"
DIT_CHECKPOINT_FILES = (f"model.safetensors|{LORA_TRAIN_FILE}", f"ema.safetensors|{LORA_FILE}",
                        "optimizer.pt|dcp", "state.pt", "run.json", "latent_stats.pt")
# train_autoencoder.py (R's latent_stats.pt is written last, at the final step)
AUTOENCODER_CHECKPOINT_FILES = ("autoencoder.safetensors", "optimizer.pt", "state.pt", "run.json")
# LPIPS' weights (train_autoencoder.py): torchvision's ImageNet VGG16 and the lpips package's layers
VGG_FILE, LIN_FILE = "vgg16-397923af.pth", "vgg.pth"


def default_folder(candidates):
    """The first of `candidates` (relative to the working directory) that is a folder, or None."""
    return next((c for c in candidates if os.path.isdir(c)), None)


def first_match(folder, patterns, unique=False):
    """The first pattern that matches wins; among its matches the last in sorted order
    (the highest stage), or, with unique=True, an error if there are several."""
    for pat in patterns:
        hits = sorted(glob.glob(os.path.join(folder, pat)))
        if len(hits) > 1 and unique:
            raise ValueError(f"{folder}: several files match {pat} ({', '.join(hits)}): choose "
                             "one with --dit")
        if hits:
            return hits[-1]
    return None


def lora_file(path):
    """sample.py --lora PATH: a LoRA file as it is; a train.py --lora run (its newest checkpoint) or
    checkpoint folder stands for its LORA_FILE."""
    return os.path.join(checkpoint_folder(path), LORA_FILE) if os.path.isdir(path) else path


def checkpoint_folder(path):
    """A training run's folder (OUT/, holding `latest`) stands for its newest checkpoint; any other
    folder for itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return os.path.join(path, f.read().strip())
    return path


def read_run_json(folder):
    """The run.json of a checkpoint folder of ours (a JSON object), or {} where there is none
    (the official release has none)."""
    f = os.path.join(folder, "run.json")
    if not os.path.isfile(f):
        return {}
    try:
        with open(f) as fh:
            run = json.load(fh)
        if not isinstance(run, dict):
            raise ValueError(f"a JSON {type(run).__name__}, not an object")
    except ValueError as e:
        raise ValueError(f"{f}: not a valid run.json ({type(e).__name__}: {e})") from None
    return run


def recorded_parts(folder):
    """The frozen parts a checkpoint of ours was trained with, as its run.json records them
    ({"autoencoder": path, ...}; a relative path is relative to the checkpoint, so a run that is
    moved whole still finds what lies inside it); {} without a run.json."""
    frozen = read_run_json(folder).get("frozen", {})
    return {k: os.path.normpath(os.path.join(folder, v)) for k, v in frozen.items()
            if isinstance(v, str) and v}


def recorded_but_gone(folder, key, path):
    """The error for a frozen part that run.json records but that no longer exists."""
    return FileNotFoundError(f"{os.path.join(folder, 'run.json')} records the {key} at {path}, "
                             f"which does not exist (was the run moved?): pass --{key}")


def find_weights(ckpt_dir, gemma_dir=None, dit=None, autoencoder=None, dinov3=None, stats=None,
                 need=("dit", "autoencoder", "stats", "gemma")):
    """Locate the files of a checkpoint folder: the official `pre-trained/` layout, or one of our
    own (training checkpoints and the bundled toy model). Explicit arguments override what is
    found, then the folder's files (FILES), then what its run.json records. Raises a clear error
    for each file in `need` that is missing."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir} ({DOWNLOAD_HINT})")
    ckpt_dir = checkpoint_folder(ckpt_dir)
    run = recorded_parts(ckpt_dir)
    given = {"dit": dit, "autoencoder": autoencoder, "dinov3": dinov3, "stats": stats,
             "gemma": gemma_dir}
    found = {key: given[key] or first_match(ckpt_dir, FILES[key], unique=key == "dit")
             or (run.get(key) if key != "dit" else None) for key in FILES}   # (a DiT: never)
    for key, path in found.items():
        gone = path is not None and not os.path.exists(path)
        # a gone record of a part this command does not need (e.g. DINOv3 when the autoencoder
        # holds encoder.*) is as if absent
        if gone and key not in need and path == run.get(key):
            found[key] = None
            continue
        if path is None and key == "dit" and os.path.isfile(os.path.join(ckpt_dir, LORA_FILE)):
            raise FileNotFoundError(f"{ckpt_dir} is a train.py --lora checkpoint (adapters only): "
                                    f"sample its base with --lora {ckpt_dir}")
        if path is None and key in need:
            raise FileNotFoundError(f"{ckpt_dir}: no {key} weights found; expected "
                                    f"{EXPECTED[key]} ({DOWNLOAD_HINT})")
        if gone and key in need:
            if path == run.get(key):
                raise recorded_but_gone(ckpt_dir, key, path)
            raise FileNotFoundError(f"{key} weights not found: {path} ({DOWNLOAD_HINT})")
    return found


def release_files():
    """The official release's frozen parts and statistics when it sits beside the command
    (./pre-trained, ./gemma-2-2b): what `torchrun train.py --stage 1 --data D --out O` uses."""
    folder = default_folder(RELEASE_DIRS)
    if folder is None:
        return {"gemma": default_folder(GEMMA_DIRS)}
    found = find_weights(folder, default_folder(GEMMA_DIRS), need=())
    return {k: found[k] for k in FROZEN + ("stats",)}


def init_weights_file(path, prefer_ema):
    """train.py --init-from: a checkpoint folder of ours (model.safetensors, or ema.safetensors
    with --init-from-ema), a run folder (its latest checkpoint), an official folder
    (consolidated[_ema].00-of-01.pth) or a weights file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"--init-from: {path} does not exist")
    path = Path(checkpoint_folder(str(path)))
    ema, plain = ["ema.safetensors", NEXTDIT_FILES[0]], ["model.safetensors", NEXTDIT_FILES[1]]
    names = ema + plain if prefer_ema else plain
    for n in names:
        if (path / n).is_file():
            return path / n
    raise UsageError(f"--init-from: no weights in {path} (expected {' or '.join(names)})")


def autoencoder_file(path, flag):
    """train_autoencoder.py's source checkpoint: our run or checkpoint folder (its
    autoencoder.safetensors), or a file (the official svg_autoencoder-*.ckpt, a safetensors file
    with the same keys)."""
    path = Path(path)
    if path.is_dir():
        path = Path(checkpoint_folder(str(path))) / "autoencoder.safetensors"
    if not path.is_file():
        raise UsageError(f"{flag}: {path} not found (expected a run or checkpoint folder of "
                         "train_autoencoder.py, or an SVG autoencoder .ckpt)")
    return path
