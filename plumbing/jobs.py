"""
sample.py's jobs: what turns a command line into images on disk, apart from the sampling itself.
Prompt files (.txt, .jsonl, .json), the GenEval and DPG-Bench layouts (image paths, metadata.jsonl,
DPG grids), --start/--end ranges, rerun-skipping, PNG metadata (written atomically), the argument
checks (every mistake one line and exit code 2, before any weights load), where the checkpoint is,
the sampler settings (flags, else the checkpoint's run.json, else svgt2i.Sampling), the edit
inputs, --reconstruct, the toy's --score and progress lines. torch is imported inside the
functions that need it, so that sample.py --help stays instant.

You need not read this to learn SVG-T2I.
"""

import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from plumbing import UsageError
from plumbing.release import (DOWNLOAD_HINT, GEMMA_DIRS, RELEASE_DIRS, TOY_BUNDLE, default_folder,
                              lora_file)

# The official evaluation scripts look for the prompt under these fields, in this order.
PROMPT_FIELDS = ("refined_prompt", "prompt", "gpt_4_caption", "caption", "text", "description",
                 "query")
# The system prompts svgt2i.SYSTEM_PROMPTS names (listed here so that --help needs no torch).
SYSTEM_PROMPT_NAMES = ("base", "align", "aesthetics", "real", "4grid", "empty")
EDIT_STRENGTH = 0.8     # --strength's default (the README's toy measurement)


class WriteError(Exception):
    """A file could not be written (a full disk, a lost mount): one line, exit code 2."""


@contextlib.contextmanager
def exit_codes():
    """sample.py's exits: bad input is one line and code 2 (plumbing.cli.command_line); so is a
    failed write, which says that the images written so far are whole; Ctrl-C is code 130 and
    says the same."""
    from plumbing.cli import command_line

    try:
        with command_line("sample.py"):
            yield
    except WriteError as e:
        print(f"sample.py: error: {e}; the images written so far are whole", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sample.py: interrupted: the images written so far are whole; the same command "
              "draws the rest", file=sys.stderr)
        sys.exit(130)


@contextlib.contextmanager
def writing(path):
    """A write that fails (the disk full, the folder gone) as one line naming the file;
    atomic_write has already removed its temporary file."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None


def toy_defaults():
    """The bundled toy's sampler settings and resolution, read from its run.json (for --help)."""
    info = json.loads(Path(TOY_BUNDLE, "run.json").read_text())
    return {**info["sample"], "resolution": info["resolution"]}


# -------------------------------------------------------------------------------------------------
# Prompt files


def read_text(path):
    """A text file's lines, UTF-8 (a byte-order mark is dropped); other bytes name file,
    line, column."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UsageError(f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[e.start]:02x}): "
                         "save the file as UTF-8") from None


def prompt_of(record, where):
    """The prompt of a prompt file's record: a string, or the first PROMPT_FIELDS field it has."""
    if isinstance(record, str):
        return record
    field_name = next((k for k in PROMPT_FIELDS if isinstance(record, dict)
                       and isinstance(record.get(k), str)), None)
    if field_name is None:
        raise UsageError(f"{where}: no prompt field; expected one of {', '.join(PROMPT_FIELDS)}")
    return record[field_name]


def read_prompts(path):
    """A prompt file: .txt (one prompt per non-empty line), .jsonl (one JSON record per line with a
    prompt field, as GenEval's and DPG-Bench's metadata) or .json (a list of prompts or records);
    extensions in any case. Returns (prompts, records); records are the parsed JSON (or None)."""
    if not os.path.isfile(path):
        raise UsageError(f"prompt file not found: {path}")
    lines, ext = read_text(path), os.path.splitext(path)[1].lower()
    if ext == ".json":
        try:
            records = json.loads("\n".join(lines))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        records = records if isinstance(records, list) else [records]
        return [prompt_of(r, f"{path}: item {i}") for i, r in enumerate(records)], records
    if ext != ".jsonl":
        return [line.strip() for line in lines if line.strip()], None
    records, prompts = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{number}: not valid JSON ({e.msg}); expected one object per "
                             "line") from None
        prompts.append(prompt_of(record, f"{path}:{number}"))
        records.append(record)
    return prompts, records


# -------------------------------------------------------------------------------------------------
# Argument checks, where the checkpoint is, the sampler settings


# The most a run may ask for, checked before anything is built: more than any machine finishes, and
# less than what the bookkeeping alone (the jobs, the step schedule, the held-out prompts, the
# images --score keeps) would take in memory.
LIMITS = {"n": 1_000_000, "steps": 10_000, "batch_size": 4096, "score": 1800}
LIMITS_WHY = {"n": "images in one run", "steps": "the official runs take 50",
              "batch_size": "images sampled together", "score": "each of the toy's 180 held-out "
              "captions ten times"}


def lora_flag(value):
    """--lora FILE or FILE:SCALE -> (FILE, SCALE); the file must exist (a LoRA run's folder stands
    for its lora.safetensors)."""
    path, _, tail = value.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        path, scale = value, 1.0
    if not path or not math.isfinite(scale):
        raise UsageError(f"--lora {value}: use FILE or FILE:SCALE with a finite scale, e.g. "
                         "lora.safetensors:0.8")
    if not os.path.exists(path):
        raise UsageError(f"--lora {path}: no such file")
    return lora_file(path), scale       # (a run's folder: recorded as the file it is now)


def check_numbers(args):
    """The numbers on the command line, before anything is loaded."""
    for name in ("h", "w"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} {v}: image sides must be positive multiples of 16")
        if v is not None and v % 16:
            raise UsageError(f"--{name} {v} is not a multiple of 16: use e.g. "
                             f"{round(v / 16) * 16 or 16}")
    for name, most in LIMITS.items():
        v, flag = getattr(args, name), "--" + name.replace("_", "-")
        if v is not None and v < 1:
            raise UsageError(f"{flag} {v}: must be at least 1")
        if v is not None and v > most:
            raise UsageError(f"{flag} {v}: at most {most:,} ({LIMITS_WHY[name]})")
    for name in ("cfg", "shift", "renorm", "cfg_trunc"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a finite number")
    args.lora = [lora_flag(value) for value in args.lora]
    if args.shift is not None and args.shift <= 0:
        raise UsageError(f"--shift {args.shift}: must be positive (1 = no shift; the official "
                         "value is 10)")
    if args.renorm is not None and args.renorm < 0:
        raise UsageError(f"--renorm {args.renorm}: must be >= 0 (0 = plain CFG)")
    if args.seed is not None and not 0 <= args.seed < 2 ** 62:
        raise UsageError(f"--seed {args.seed}: use a number from 0 to 2^62")
    if args.start < 0 or (args.end is not None and args.end <= args.start):
        raise UsageError(f"--start {args.start} --end {args.end}: need 0 <= start < end")
    sp = args.system_prompt
    if sp is not None and sp not in SYSTEM_PROMPT_NAMES and not sp.startswith("text:"):
        raise UsageError(f"--system-prompt {sp!r}: not one of {', '.join(SYSTEM_PROMPT_NAMES)}; "
                         "for a literal system prompt write text:YOUR PROMPT")


def check_modes(args):
    """--reconstruct and --score draw no prompts: --enhance and the edit flags are errors."""
    if (args.reconstruct or args.score is not None) and (args.enhance or args.init_image
                                                         or args.init_images or args.mask):
        raise UsageError("--enhance and the image-to-image flags do not apply to --reconstruct "
                         "or --score")


def check_size(height, width):
    """Multiples of 16 within the DiT's RoPE range (checked before the weights are loaded, so a
    huge size fails at once instead of in the allocator)."""
    from nextdit import NextDiTConfig
    from plumbing.checks import check_image_size

    check_image_size(height, width)
    rows, cols = NextDiTConfig().axes_lens[1:]
    if height // 16 >= rows or width // 16 >= cols:
        raise UsageError(f"image size {height}x{width}: the DiT's positions cover at most "
                         f"{16 * (rows - 1)}x{16 * (cols - 1)} px")


def checkpoint_dirs(args):
    """(checkpoint folder, Gemma folder or None): the flags, else --toy's bundle, else the release
    beside the command (./pre-trained, ./gemma-2-2b)."""
    ckpt = args.ckpt or (TOY_BUNDLE if args.toy else default_folder(RELEASE_DIRS))
    if ckpt is None:
        raise UsageError("no checkpoint: pass --ckpt FOLDER (the official pre-trained/ folder or "
                         f"a training checkpoint; looked in ./{', ./'.join(RELEASE_DIRS)}), or "
                         "--toy for the bundled toy model")
    if not os.path.isdir(ckpt):
        raise UsageError(f"checkpoint folder not found: {ckpt} ({DOWNLOAD_HINT})")
    return ckpt, args.gemma or (None if args.toy else default_folder(GEMMA_DIRS))


def resolve_settings(args, ckpt):
    """Sampler settings: the command line, else the checkpoint's own defaults (run.json "sample",
    as the toy model has), else svgt2i.Sampling's; --enhance conditions on the enhancer's system
    prompt. Returns the image (height, width): --h/--w, else the checkpoint's resolution, else
    1024."""
    from plumbing.enhancer import ENHANCE_SYSTEM_PROMPT
    from plumbing.release import checkpoint_folder, read_run_json
    from svgt2i import Sampling

    if args.enhance and args.system_prompt is None:
        args.system_prompt = ENHANCE_SYSTEM_PROMPT
    run_info = read_run_json(checkpoint_folder(ckpt))
    for k, v in {**vars(Sampling()), **run_info.get("sample", {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.system_prompt.startswith("text:"):
        args.system_prompt = args.system_prompt[len("text:"):]
    height = args.h or run_info.get("resolution", 1024)
    width = args.w or height
    check_size(height, width)
    return height, width


def sampling(args):
    """The svgt2i.Sampling of the command line (after resolve_settings)."""
    from svgt2i import Sampling

    return Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})


def weight_flags(args):
    """The per-file flags, as SVGT2I.from_pretrained takes them: each replaces what is found;
    the LoRAs (FILE, SCALE) are merged into the DiT."""
    return dict(dit=args.dit, autoencoder=args.autoencoder, stats=args.stats, dinov3=args.dinov3,
                lora=args.lora)


def say_loaded(pipe, device, dtype, t0):
    """What was loaded (the DiT file), on which device and dtype, how fast."""
    print(f"loaded {pipe.files['dit']} (+ autoencoder, statistics, Gemma) on {device} "
          f"({str(dtype).replace('torch.', '')}) in {time.time() - t0:.1f}s", file=sys.stderr)
    for path, scale in pipe.files.get("lora", ()):
        print(f"merged LoRA {path} at scale {scale:g}", file=sys.stderr)


# -------------------------------------------------------------------------------------------------
# Where the images go


def check_writable(folder, flag):
    """`folder` exists (or is made) and takes a file, checked before anything is drawn."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tmp-check-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write there ({e.strerror or e})") from None


def image_paths(args, n_prompts, n, indices=None):
    """{(prompt index, sample): path} of every image of the run (of the prompts `indices`, default
    all n_prompts), and the folder they share."""
    root = args.outdir or "samples"
    indices = range(n_prompts) if indices is None else indices
    if args.layout in ("geneval", "dpg"):
        return {(i, j): os.path.join(root, f"{i:05d}", "samples", f"{j:05d}.png")
                for i in indices for j in range(n)}, root
    if args.out:
        stem, ext = os.path.splitext(args.out)
        if os.path.islink(args.out):    # replacing it loses the link, following it writes away
            raise UsageError(f"--out {args.out} is a symbolic link (to {os.readlink(args.out)}): "
                             "sample.py writes only real files; remove the link, or choose "
                             "another --out")
        if ext.lower() != ".png" or os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: give a file name ending in .png (for a folder, "
                             "use --outdir)")
        if os.path.exists(args.out) and not os.path.isfile(args.out):
            raise UsageError(f"--out {args.out}: exists and is not a regular file")
        one = n_prompts * n == 1
        return {(i, j): args.out if one else f"{stem}_{i * n + j:05d}{ext}"
                for i in indices for j in range(n)}, os.path.dirname(args.out) or "."
    return {(i, j): os.path.join(root, f"{i * n + j:05d}.png")
            for i in indices for j in range(n)}, root


def claim_outputs(args, n_prompts, records, indices, n):
    """The image paths of the prompts `indices` (image_paths), once their folder takes files, no
    link or folder is in the way of the run's files, this run holds the lock on its images and a
    killed run's temporary files are gone. Returns (paths, the lock)."""
    paths, folder = image_paths(args, n_prompts, n, indices)
    flag = "--out" if args.out and args.layout == "flat" else "--outdir"
    check_writable(folder, flag)
    outputs = [*paths.values(), *(path for _, _, path in layout_files(args, records, indices))]
    label = f"{flag} {args.out if flag == '--out' else folder}"     # what names the place
    check_outputs(folder, outputs, label)
    if args.layout != "flat":       # geneval and dpg: the same files per prompt
        key, first, last = "outdir:benchmark", indices.start, indices.stop
    else:
        key = f"out:{os.path.basename(args.out)}" if flag == "--out" else "outdir:flat"
        first, last = indices.start * n, indices.stop * n
    lock = lock_images(folder, key, first, last, label)
    remove_stale_temps(outputs)
    return paths, lock


# A PNG whose text metadata has one of these keys is one sample.py drew (a sample, a
# reconstruction, a --score sheet): the only files a run replaces without --overwrite.
OUR_KEYS = ("seed", "reconstruction of")


def drawn_here(path):
    """(text metadata, "") if `path` is a whole PNG that sample.py drew, else (None, why not)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        return None, "not a regular file"
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return None, f"a {im.format} image"
            text = dict(im.text)            # reads the whole file: a truncated one fails here
    except UnidentifiedImageError:
        return None, "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, "a truncated or damaged image"
    if not any(k in text for k in OUR_KEYS):
        return None, "a PNG without sample.py's settings in it"
    return text, ""


def check_out_file(path, overwrite):
    """A single output file (--reconstruct's, --score's sheet; image_paths has refused links and
    folders) may replace only an image that sample.py drew, unless --overwrite."""
    if os.path.lexists(path) and not overwrite and drawn_here(path)[0] is None:
        raise UsageError(f"--out {path} exists and is not an image sample.py drew "
                         f"({drawn_here(path)[1]}): move it away, or pass --overwrite to "
                         "replace it")


def check_outputs(root, paths, flag):
    """Nothing from `root` (which may itself be a link: the user named it) down to each of the
    run's files is a symbolic link, and nothing but a file is in their place: a link planted in
    an output folder would send the images elsewhere, and replacing a folder would delete it.
    `flag`: the flag and value that name the place ("--outdir out", "--out a.png")."""
    seen = set()
    for path in paths:
        p = root
        for part in Path(os.path.relpath(path, root)).parts:
            p = os.path.normpath(os.path.join(p, part))
            if p in seen:
                continue
            seen.add(p)
            if os.path.islink(p):
                raise UsageError(f"{flag}: {p} is a symbolic link (to {os.readlink(p)}): "
                                 "sample.py writes only real folders and files; remove the "
                                 f"link, or choose another {flag.split()[0]}")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UsageError(f"{flag}: {path} exists and is not a regular file: move it away, "
                             f"or choose another {flag.split()[0]}")


def finished(path, meta):
    """Whether `path` is an image of this run already (a rerun skips it). An image made with other
    settings is an error, and so is a file sample.py did not draw: a rerun must neither mix runs
    nor replace what a user made."""
    from svgt2i import Sampling

    if not os.path.lexists(path):
        return False
    theirs, why = drawn_here(path)
    if theirs is None:
        raise UsageError(f"{path} exists and is not an image sample.py drew ({why}): move it "
                         "away, or pass --overwrite to replace it")
    # the PNG metadata that must agree: the image's own, every sampler setting, the edit's
    sampler = [f.name for f in dataclasses.fields(Sampling)]
    settings = ("prompt", "seed", "height", "width", *sampler, "strength", "init_image", "mask")
    diff = [k for k in settings if (k in meta or k in theirs) and theirs.get(k) != str(meta.get(k))]
    if diff:
        k = diff[0]
        raise UsageError(f"{path} was made with other settings ({k} {theirs.get(k)!r}, this run "
                         f"{str(meta.get(k))!r}): pass --overwrite to redo it, or another --outdir")
    return True


def lock_images(folder, key, first, last, label):
    """Lock images first..last-1 of the output set `key` ("outdir:flat", "outdir:benchmark",
    "out:NAME") in `folder` for the life of this process, so that runs of disjoint ranges share
    a folder (the README's split over GPUs) and one that overlaps a live run is refused before
    it draws. A POSIX lock on that byte range of folder/.sample.lock: the OS drops it when the
    process dies, however it dies. Returns the open lock file: the lock lasts while it is open."""
    import fcntl
    import zlib

    # each key its own stretch of the file: 2^32 images from its hash's multiple of 2^32 on
    start = (zlib.crc32(key.encode()) % 2 ** 30 << 32) + first
    f = open(os.path.join(folder, ".sample.lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, last - first, start)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):     # no locks here (some network mounts)
            print(f"sample.py: note: {folder} cannot be locked ({e.strerror}): runs into it are "
                  "not checked for overlapping images", file=sys.stderr)
            return f
        holder = lock_holder(f, start, last - first)
        f.close()
        raise UsageError(f"{label} is in use by another run (pid {holder}) drawing some of the "
                         f"same images: wait for it to finish, or give this run another "
                         f"{label.split()[0]} or its own --start/--end range") from None
    return f


def lock_holder(f, start, length):
    """The pid of the process holding a POSIX lock on bytes start..start+length of the open file
    `f` (fcntl F_GETLK with Linux's struct flock), or "unknown"."""
    import fcntl
    import struct

    if not sys.platform.startswith("linux"):
        return "unknown"
    layout = "hhqqi4x"          # l_type, l_whence, l_start, l_len, l_pid (and padding)
    query = struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
    try:
        kind, _, _, _, pid = struct.unpack(layout, fcntl.fcntl(f, fcntl.F_GETLK, query))
    except OSError:
        return "unknown"
    return str(pid) if kind != fcntl.F_UNLCK and pid > 0 else "unknown"


def remove_stale_temps(paths):
    """Remove the temporary files (plumbing.files.atomic_write's .tmpPID-NAME) that a killed run
    left beside this run's files (a scorer reading the folder would take them for images): only
    those of our exact naming, for one of these names, of a process that is gone."""
    names = {}
    for path in paths:
        names.setdefault(os.path.dirname(path) or ".", set()).add(os.path.basename(path))
    removed = []
    for folder, ours in names.items():
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            pid, _, name = entry.name[len(".tmp"):].partition("-")
            if (entry.name.startswith(".tmp") and pid.isdigit() and name in ours
                    and entry.is_file(follow_symlinks=False) and not alive(int(pid))):
                os.unlink(entry.path)
                removed.append(entry.path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by a killed run, e.g. {removed[0]}",
              file=sys.stderr)


def alive(pid):
    """Whether a process `pid` exists on this machine (this one's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                         # someone else's
    return True


def save_png(image, path, meta):
    """Write `image` with its settings as text metadata, whole or not at all."""
    from PIL.PngImagePlugin import PngInfo

    from plumbing.files import atomic_write

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    with writing(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def dpg_grid(paths, columns=2, border=2):
    """The official DPG-Bench grid (torchvision make_grid's layout): the images in rows of
    `columns`, a black `border` px around and between them."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    w, h = images[0].size
    rows = -(-len(images) // columns)
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * (w + border) + border, rows * (h + border) + border))
    for k, im in enumerate(images):
        grid.paste(im, (border + (k % cols) * (w + border), border + (k // cols) * (h + border)))
    return grid


def layout_files(args, records, indices):
    """[(prompt index, kind, path)] of what the benchmark layouts keep beside the images of the
    prompts `indices`: geneval's and dpg's metadata.jsonl, dpg's grid (named by the record's
    "filename", as the official script does)."""
    root = args.outdir or "samples"
    files = [(i, "metadata", os.path.join(root, f"{i:05d}", "metadata.jsonl"))
             for i in indices if args.layout != "flat"]
    if args.layout == "dpg":
        files += [(i, "grid", os.path.join(root, "grid_output",
                                           Path(records[i]["filename"]).stem + ".png"))
                  for i in indices]
    return files


def write_layout_files(args, plan, done):
    """What the benchmark layouts keep next to the images of the jobs `done`: geneval's
    metadata.jsonl per prompt, and dpg's grid of each prompt whose images are all drawn."""
    from plumbing.files import atomic_write

    indices = sorted({job.prompt_index for job in done})
    for i, kind, path in layout_files(args, plan.records, indices):
        record = plan.records[i] if plan.records else {"prompt": plan.prompts[i]}
        mine = [plan.paths[(i, j)] for j in range(plan.n)]
        if kind == "grid" and not all(os.path.isfile(p) for p in mine):
            continue                        # the grid once all of the prompt's images are drawn
        with writing(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if kind == "metadata":
                atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))
            else:
                atomic_write(path, lambda tmp: dpg_grid(mine).save(tmp, format="PNG"))


# -------------------------------------------------------------------------------------------------
# Image-to-image inputs


def pair_edits(prompts, images):
    """Prompts and init images, one each: one prompt edits every image, one image is edited by
    every prompt, or they pair in order."""
    if len(prompts) == 1:
        prompts = prompts * len(images)
    elif len(images) == 1:
        images = images * len(prompts)
    if len(prompts) != len(images):
        raise UsageError(f"{len(prompts)} prompts for {len(images)} init images: give one "
                         "prompt, one image, or as many prompts as images")
    return prompts, images


def edit_inputs(args, prompts):
    """--init-image(s), --strength and --mask: (prompts, one init image path per prompt, the
    SVGT2I.generate keywords), checked before anything is loaded; (prompts, None, {}) without
    an init image."""
    from plumbing.checks import check_masks, check_strength
    from plumbing.files import read_image, read_images

    if args.init_image and args.init_images:
        raise UsageError("use either --init-image or --init-images, not both")
    if (args.init_image or args.init_images) and args.layout != "flat":
        raise UsageError("editing writes the flat layout: drop --layout")
    if not (args.init_image or args.init_images):
        if args.strength is not None or args.mask:
            raise UsageError("--strength and --mask need --init-image or --init-images")
        return prompts, None, {}
    pairs = ([(args.init_image, read_image(args.init_image))] if args.init_image
             else read_images(args.init_images))
    prompts, pairs = pair_edits(prompts, pairs)
    edit = dict(init_images=[image for _, image in pairs],
                strength=EDIT_STRENGTH if args.strength is None else args.strength)
    if args.mask:
        edit["mask"] = read_image(args.mask, "L")
    check_strength(edit["strength"])
    if args.mask:
        check_masks(edit["init_images"], [edit["mask"]] * len(pairs))
    return prompts, [path for path, _ in pairs], edit


# -------------------------------------------------------------------------------------------------
# The run's images: jobs, the plan, what a rerun skips


@dataclass
class Job:
    """One image of the run: the prompt it draws (and its index in the prompt list), its file, its
    seed (image k = prompt index * n + sample starts from noise seeded seed + k) and its PNG
    metadata."""
    prompt_index: int
    prompt: str
    path: str
    seed: int
    meta: dict = field(default_factory=dict)

    @property
    def text(self):
        """What conditions the image: the prompt, or its --enhance rewrite."""
        return self.meta.get("enhanced_prompt", self.prompt)


@dataclass
class Plan:
    """Every image of a run, checked before any weights load."""
    jobs: list              # Job per image of the --start/--end range
    todo: list              # the jobs not drawn yet (a rerun skips the rest; all with --overwrite)
    prompts: list           # every prompt (their indices are the benchmark's)
    records: list | None    # the prompt file's JSON records (the layouts' metadata), or None
    n: int                  # images per prompt
    paths: dict             # {(prompt index, sample): path} of every image (a DPG grid needs all)
    seed: int               # image k: seed + k
    edit: dict              # SVGT2I.generate's edit keywords, init images one per prompt; {}: none
    lock: object = None     # the lock on this run's images in their folder (lock_images)

    def edit_of(self, batch):
        """The edit keywords of a batch of jobs: their init images, the strength and mask."""
        if not self.edit:
            return {}
        return {**self.edit, "init_images": [self.edit["init_images"][job.prompt_index]
                                             for job in batch]}


def read_prompt_list(args):
    """(prompts, records) of --prompt or --prompts FILE."""
    prompts, records = list(args.prompt), None
    if args.prompts:
        if prompts:
            raise UsageError("use either --prompt or --prompts FILE, not both")
        prompts, records = read_prompts(args.prompts)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts, records


def record_places(path, count):
    """Where each record of a prompt file is, for error messages: FILE:LINE (.jsonl, as
    read_prompts counts them) or FILE: item K (.json)."""
    if os.path.splitext(path)[1].lower() == ".json":
        return [f"{path}: item {k}" for k in range(count)]
    return [f"{path}:{number}" for number, line in enumerate(read_text(path), 1) if line.strip()]


def check_dpg_records(path, records):
    """--layout dpg names each prompt's grid after its record's "filename" (as DPG-Bench's
    dpg.jsonl has): every record needs one with a file name in it, and no two the same grid."""
    if not records:
        raise UsageError("--layout dpg needs a .jsonl --prompts file whose records have a "
                         "\"filename\" (as DPG-Bench's dpg.jsonl)")
    grids = {}
    for where, record in zip(record_places(path, len(records)), records):
        name = record.get("filename") if isinstance(record, dict) else None
        stem = Path(name).stem if isinstance(name, str) else ""
        if not stem:
            raise UsageError(f"{where}: --layout dpg needs a \"filename\" naming the prompt's "
                             f"grid (as DPG-Bench's dpg.jsonl has), got {name!r}")
        if stem in grids:
            raise UsageError(f"{where}: \"filename\" {name!r} names the same grid "
                             f"(grid_output/{stem}.png) as {grids[stem]}: give each its own")
        grids[stem] = where


def plan_images(args, ckpt, dtype, height, width):
    """Every image of the run as a Job with its path and PNG metadata (prompt, seed, every setting,
    the edit's), in the --start/--end range; a rerun's finished images are left out of todo (one
    made with other settings is an error). Checked before any weights load."""
    prompts, records = read_prompt_list(args)
    prompts, init_paths, edit = edit_inputs(args, prompts)
    if args.layout == "dpg":
        check_dpg_records(args.prompts, records)
    n = args.n or (4 if args.layout in ("geneval", "dpg") else 1)
    end = len(prompts) if args.end is None else min(args.end, len(prompts))
    if args.start >= end:
        raise UsageError(f"--start {args.start}: there are only {len(prompts)} prompt(s)")
    if (end - args.start) * n > LIMITS["n"]:
        raise UsageError(f"{(end - args.start) * n:,} images in one run (prompts {args.start} to "
                         f"{end - 1}, {n} each): at most {LIMITS['n']:,}; split it with "
                         "--start/--end")
    paths, lock = claim_outputs(args, len(prompts), records, range(args.start, end), n)
    seed = 42 if args.seed is None else args.seed
    settings = dict(height=height, width=width, **vars(sampling(args)),
                    dtype=args.dtype or str(dtype).replace("torch.", ""),
                    ckpt="toy" if args.toy and not args.ckpt else ckpt)
    if args.lora:
        settings["lora"] = "; ".join(f"{path}:{scale:g}" for path, scale in args.lora)
    if edit:
        settings.update(strength=edit["strength"], **({"mask": args.mask} if args.mask else {}))
    jobs = [Job(i, prompts[i], paths[(i, j)], seed + i * n + j,
                dict(prompt=prompts[i], seed=seed + i * n + j, **settings,
                     **({"init_image": init_paths[i]} if init_paths else {})))
            for i in range(args.start, end) for j in range(n)]
    todo = jobs if args.overwrite else [job for job in jobs if not finished(job.path, job.meta)]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} images already drawn: skipped "
              "(--overwrite redoes them)", file=sys.stderr)
    return Plan(jobs, todo, prompts, records, n, paths, seed, edit, lock)


def enhance_prompts(pipe, todo):
    """--enhance: each distinct prompt rewritten once, before any image, printed, and recorded in
    the PNG metadata of its images (Job.text is then the rewrite)."""
    enhanced = {p: pipe.enhance_prompt(p) for p in dict.fromkeys(job.prompt for job in todo)}
    for p, e in enhanced.items():
        print(f"enhanced prompt: {p!r} -> {e!r}", file=sys.stderr)
    for job in todo:
        job.meta["enhanced_prompt"] = enhanced[job.prompt]


def step_progress(progress, start, count):
    """SVGT2I.generate's progress callback for the batch of images start+1..start+count."""
    def step(idx, i, steps):
        progress(start, f" | step {i}/{steps} of images {start + 1}-{start + count}")
    return step


# -------------------------------------------------------------------------------------------------
# --reconstruct and the toy's --score


def reconstruct(args, ckpt, device):
    """--reconstruct: what the autoencoder keeps of an image (encoded and decoded), as a PNG."""
    from plumbing import loading
    from plumbing.files import read_image
    from plumbing.release import find_weights

    if not args.out:
        raise UsageError("--reconstruct needs --out FILE.png")
    if not os.path.isfile(args.reconstruct):
        raise UsageError(f"image not found: {args.reconstruct}")
    image_paths(args, 1, 1)
    check_writable(os.path.dirname(args.out) or ".", "--out")
    check_out_file(args.out, args.overwrite)
    image = read_image(args.reconstruct)
    files = find_weights(ckpt, autoencoder=args.autoencoder, dinov3=args.dinov3,
                         need=("autoencoder",))
    ae = loading.load_autoencoder(files["autoencoder"], dinov3_path=files["dinov3"], device=device)
    if ae.encoder is None:
        raise UsageError("the autoencoder checkpoint has no encoder.* keys: pass --dinov3 "
                         "dinov3_vits16plus_pretrain_lvd1689m-*.pth")
    save_png(ae.reconstruct(image), args.out, {"reconstruction of": args.reconstruct})
    print(f"wrote {args.out}", file=sys.stderr)


def score_toy(args, ckpt, gemma, device, dtype, height, width):
    """The toy model's prompt-following score: held-out prompts of the shapes world, seeds seed +
    k, each image read back by toy.score (count, colour, shape, position)."""
    from PIL import Image

    import toy
    from svgt2i import SVGT2I

    if args.out:
        image_paths(args, 1, 1)
        check_out_file(args.out, args.overwrite)
    t0 = time.time()
    pipe = SVGT2I.from_pretrained(ckpt, gemma, device=device, dtype=dtype, **weight_flags(args))
    if args.compile:
        pipe.compile()
    say_loaded(pipe, device, dtype, t0)
    prompts = toy.heldout_prompts(args.score)
    seed = args.seed if args.seed is not None else 0
    t0 = time.time()
    images = pipe.generate(prompts, height, width, seed=seed, sampling=sampling(args),
                           batch_size=max(args.batch_size, 30))
    summary = toy.summarise([toy.score(im, p) for im, p in zip(images, prompts)])
    print(f"{len(prompts)} held-out prompts, seed {seed}, cfg {args.cfg}, {args.steps} "
          f"{args.solver} steps, shift {args.shift} ({time.time() - t0:.1f}s)")
    for k in toy.CATEGORIES:
        print(f"{k:>9s}  {summary[k]:.3f}")
    if args.out:
        cols = 12
        sheet = Image.new("RGB", (cols * width, -(-len(images) // cols) * height), "white")
        for k, im in enumerate(images):
            sheet.paste(im, ((k % cols) * width, (k // cols) * height))
        save_png(sheet, args.out, {"score of": f"{len(prompts)} held-out prompts", "seed": seed})
        print(f"wrote {args.out}", file=sys.stderr)
    return summary
