"""
Sample images from SVG-T2I.

    python sample.py --prompt "a cat on a sofa" --h 1024 --w 1024   # the release in ./pre-trained
    python sample.py --toy --prompt "two red circles on the left" --out shapes.png
    python sample.py --prompts geneval_metadata.jsonl --layout geneval --outdir geneval/
    python sample.py --prompts dpg.jsonl --layout dpg --outdir dpg/ --start 0 --end 266
    python sample.py --reconstruct in.png --out rec.png             # what the autoencoder keeps
    python sample.py --toy --init-image in.png --strength 0.8 --prompt "two blue circles"
    python sample.py --prompt "a cat" --enhance                    # rewritten by Gemma-2 first

Each image is written as soon as its batch is decoded (under a temporary name, then renamed), so an
interrupted run keeps every image it finished, and running the same command again completes it.
Every PNG carries its prompt, seed and sampler settings as text metadata. Mistakes in the input
(sizes, numbers, devices, files, output locations) print one line and exit with code 2 before any
weights load. torch is imported only once the arguments are read, so --help is instant.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# The official evaluation scripts look for the prompt under these fields, in this order.
PROMPT_FIELDS = ("refined_prompt", "prompt", "gpt_4_caption", "caption", "text", "description",
                 "query")
# The system prompts svgt2i.SYSTEM_PROMPTS names (listed here so that --help needs no torch).
SYSTEM_PROMPT_NAMES = ("base", "align", "aesthetics", "real", "4grid", "empty")
EDIT_STRENGTH = 0.8     # --strength's default (the README's toy measurement)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


# -------------------------------------------------------------------------------------------------
# Prompts


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
    if isinstance(record, str):
        return record
    field = next((k for k in PROMPT_FIELDS if isinstance(record, dict)
                  and isinstance(record.get(k), str)), None)
    if field is None:
        raise UsageError(f"{where}: no prompt field; expected one of {', '.join(PROMPT_FIELDS)}")
    return record[field]


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
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per "
                             "line") from None
        prompts.append(prompt_of(rec, f"{path}:{n}"))
        records.append(rec)
    return prompts, records


# -------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    import toy      # the toy's sampling defaults for --help (numpy and PIL only: no torch)

    t = toy.SAMPLING
    p = argparse.ArgumentParser(description="Sample images from SVG-T2I. Sampler defaults: the "
                                "official evaluation settings, or a checkpoint's own (the toy's).")
    g = p.add_argument_group("what to draw")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts", help="a .txt file (one prompt per line), or a .jsonl / .json file "
                   f"of records with a prompt field ({', '.join(PROMPT_FIELDS[:3])}, ...)")
    g.add_argument("--h", type=int, default=None, help="image height in px, a multiple of 16 "
                   "(default: the checkpoint's training resolution, else 1024)")
    g.add_argument("--w", type=int, default=None, help="image width in px, a multiple of 16 "
                   "(default: as --h)")
    g.add_argument("--n", type=int, default=None, help="images per prompt (default 1; 4 for the "
                   "geneval and dpg layouts)")
    g.add_argument("--seed", type=int, default=None, help="image k of the run (prompt k // n, "
                   "sample k %% n) starts from noise seeded seed + k (default 42, the official "
                   "evaluation seed; --score: 0)")
    g.add_argument("--start", type=int, default=0, help="first prompt index to draw (to split a "
                   "benchmark over machines)")
    g.add_argument("--end", type=int, default=None, help="prompt index to stop before (default: "
                   "all)")
    g.add_argument("--enhance", action="store_true", help="rewrite each prompt with Gemma-2 first "
                   "(the official enhancer) and condition on the 'align' system prompt (unless "
                   "--system-prompt)")
    g = p.add_argument_group("image-to-image")
    g.add_argument("--init-image", default=None, metavar="IMAGE", help="edit IMAGE with the "
                   "prompt (fitted to the size, encoded, noised to the --strength point, then "
                   "sampled)")
    g.add_argument("--init-images", default=None, metavar="DIR", help="edit every image of DIR "
                   "(sorted by name), with one prompt for all or one per image")
    g.add_argument("--strength", type=float, default=None, help="the fraction of the steps an edit "
                   "runs: 1 = text-to-image from the seed, 0 = the autoencoder's reconstruction "
                   f"(default {EDIT_STRENGTH})")
    g.add_argument("--mask", default=None, metavar="MASK", help="edit only where MASK (an image "
                   "the init image's size) is white, in 16-px tokens; black tokens are kept")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=int, default=None,
                   help=f"model evaluations (default 50; --toy {t['steps']})")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, 1 = "
                   f"off (default 4.0; --toy {t['cfg']})")
    g.add_argument("--shift", type=float, default=None, help="time shift of the grid, > 0 "
                   f"(default 10.0, the official evaluation value; --toy {t['shift']})")
    g.add_argument("--solver", choices=["euler", "dpm"], default=None, help="euler (the paper's "
                   "sampler) or dpm (DPM-Solver++ 2M, the official scripts' default) (default "
                   "euler)")
    g.add_argument("--renorm", type=float, default=None, help="clip ||guided|| to renorm * "
                   "||cond||, 0 = plain CFG (default 1.0)")
    g.add_argument("--cfg-trunc", type=float, default=None, help="guide only while t < this "
                   "(default 100.0: always)")
    g.add_argument("--negative", default=None, help="negative prompt (default: empty, without "
                   "system prompt)")
    g.add_argument("--system-prompt", default=None, help=f"{', '.join(SYSTEM_PROMPT_NAMES)}, or "
                   "text:YOUR PROMPT for a literal one (default base; --toy empty)")
    g = p.add_argument_group("weights (nothing is downloaded)")
    g.add_argument("--ckpt", default=None, help="checkpoint folder: the official pre-trained/ "
                   "folder or a training checkpoint (default: ./pre-trained)")
    g.add_argument("--gemma", default=None, help="Gemma-2-2B folder (config.json, safetensors, "
                   "tokenizer.model) (default: ./gemma-2-2b, else ./pre-trained/gemma-2-2b)")
    g.add_argument("--toy", action="store_true", help="the bundled toy model (assets/toy), with "
                   f"its own sampler defaults: {t['steps']} steps, cfg {t['cfg']}, shift "
                   f"{t['shift']}, {t['solver']}, empty system prompt, 64 px")
    g.add_argument("--dit", default=None, help="override: DiT weights file")
    g.add_argument("--autoencoder", default=None, help="override: autoencoder checkpoint")
    g.add_argument("--dinov3", default=None, help="override: DINOv3 weights (for --reconstruct "
                   "and editing)")
    g.add_argument("--stats", default=None, help="override: latent statistics file")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default "
                   "auto: cuda when a GPU is visible)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="DiT and Gemma dtype "
                   "(default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--batch-size", type=int, default=1, help="images sampled together (default 1)")
    g.add_argument("--offload", action="store_true", help="move Gemma to the CPU once captions "
                   "are encoded")
    g.add_argument("--compile", action="store_true", help="torch.compile each DiT block "
                   "(regional; the first step compiles)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output .png (with several images: "
                   "NAME_00000.png, ...)")
    g.add_argument("--outdir", default=None, help="output folder (default: samples/)")
    g.add_argument("--layout", choices=["flat", "geneval", "dpg"], default="flat",
                   help="flat: OUTDIR/{k:05d}.png; geneval: {index:05d}/metadata.jsonl and "
                   "{index:05d}/samples/{j:05d}.png; dpg: those, and the 2x2 grid of each prompt "
                   "in grid_output/{filename stem}.png (default flat)")
    g.add_argument("--overwrite", action="store_true", help="redo images that already exist "
                   "(default: a rerun skips them)")
    g.add_argument("--reconstruct", default=None, metavar="IMAGE",
                   help="encode and decode IMAGE with the autoencoder instead of sampling")
    g.add_argument("--score", type=int, nargs="?", const=180, default=None, metavar="N",
                   help="toy model: draw N held-out prompts of the shapes world and print the "
                   "prompt-following accuracy per category (--out saves a sheet of the images)")
    return p.parse_args(argv)


def check_numbers(args):
    """The numbers on the command line, before anything is loaded."""
    for name in ("h", "w"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} {v}: image sides must be positive multiples of 16")
        if v is not None and v % 16:
            raise UsageError(f"--{name} {v} is not a multiple of 16: use e.g. "
                             f"{round(v / 16) * 16 or 16}")
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least "
                             "1")
    for name in ("cfg", "shift", "renorm", "cfg_trunc"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a finite number")
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


def check_size(height, width):
    """Multiples of 16 within the DiT's RoPE range (checked before the weights are loaded, so a
    huge size fails at once instead of in the allocator)."""
    from nextdit import NextDiTConfig
    from svgt2i import check_image_size

    check_image_size(height, width)
    rows, cols = NextDiTConfig().axes_lens[1:]
    if height // 16 >= rows or width // 16 >= cols:
        raise UsageError(f"image size {height}x{width}: the DiT's positions cover at most "
                         f"{16 * (rows - 1)}x{16 * (cols - 1)} px")


def checkpoint_dirs(args):
    """(checkpoint folder, Gemma folder or None): the flags, else --toy's bundle, else the release
    beside the command (./pre-trained, ./gemma-2-2b)."""
    import toy
    from svgt2i import GEMMA_DIRS, RELEASE_DIRS, default_folder

    from svgt2i import DOWNLOAD_HINT

    ckpt = args.ckpt or (toy.BUNDLE if args.toy else default_folder(RELEASE_DIRS))
    if ckpt is None:
        raise UsageError("no checkpoint: pass --ckpt FOLDER (the official pre-trained/ folder or "
                         f"a training checkpoint; looked in ./{', ./'.join(RELEASE_DIRS)}), or "
                         "--toy for the bundled toy model")
    if not os.path.isdir(ckpt):
        raise UsageError(f"checkpoint folder not found: {ckpt} ({DOWNLOAD_HINT})")
    return ckpt, args.gemma or (None if args.toy else default_folder(GEMMA_DIRS))


def resolve_settings(args, ckpt):
    """Sampler settings: the command line, else the checkpoint's own defaults (run.json "sample",
    as the toy model has), else svgt2i.Sampling's. Returns the image (height, width): --h/--w, else
    the checkpoint's resolution, else 1024."""
    from svgt2i import Sampling, checkpoint_folder

    run_info = {}
    run_json = os.path.join(checkpoint_folder(ckpt), "run.json")
    if os.path.isfile(run_json):
        try:
            run_info = json.loads(Path(run_json).read_text())
        except ValueError as e:
            raise UsageError(f"{run_json}: not valid JSON ({e})") from None
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
    from svgt2i import Sampling

    return Sampling(**{k: getattr(args, k) for k in Sampling.names()})


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


def image_paths(args, n_prompts, n):
    """{(prompt index, sample): path} of every image of the run, and the folder they share."""
    root = args.outdir or "samples"
    if args.layout in ("geneval", "dpg"):
        return {(i, j): os.path.join(root, f"{i:05d}", "samples", f"{j:05d}.png")
                for i in range(n_prompts) for j in range(n)}, root
    if args.out:
        stem, ext = os.path.splitext(args.out)
        if ext.lower() != ".png" or os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: give a file name ending in .png (for a folder, "
                             "use --outdir)")
        if os.path.exists(args.out) and not os.path.isfile(args.out):
            raise UsageError(f"--out {args.out}: exists and is not a regular file")
        one = n_prompts * n == 1
        return {(i, j): args.out if one else f"{stem}_{i * n + j:05d}{ext}"
                for i in range(n_prompts) for j in range(n)}, os.path.dirname(args.out) or "."
    return {(i, j): os.path.join(root, f"{i * n + j:05d}.png")
            for i in range(n_prompts) for j in range(n)}, root


def finished(path, meta):
    """Whether `path` is an image of this run already (a rerun skips it). An image made with other
    settings is an error: the rerun must not mix runs."""
    from PIL import Image

    from svgt2i import Sampling

    try:
        with Image.open(path) as im:
            theirs = dict(im.text)
    except (OSError, ValueError):
        return False                       # absent, or not a whole PNG: draw it
    # the PNG metadata that must agree: the image's own, every sampler setting, the edit's
    settings = ("prompt", "seed", "height", "width", *Sampling.names(), "strength", "init_image",
                "mask")
    diff = [k for k in settings if (k in meta or k in theirs) and theirs.get(k) != str(meta.get(k))]
    if diff:
        k = diff[0]
        raise UsageError(f"{path} was made with other settings ({k} {theirs.get(k)!r}, this run "
                         f"{str(meta.get(k))!r}): pass --overwrite to redo it, or another --outdir")
    return True


def save_png(image, path, meta):
    """Write `image` with its settings as text metadata, whole or not at all."""
    from PIL.PngImagePlugin import PngInfo

    from svgt2i import atomic_write

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
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


def write_layout_files(args, records, prompts, indices, n, paths):
    """What the benchmark layouts keep next to the images: geneval's metadata.jsonl per prompt, and
    dpg's grid of each prompt whose images are all done."""
    from svgt2i import atomic_write

    if args.layout == "flat":
        return
    root = args.outdir or "samples"
    for i in indices:
        rec = records[i] if records else {"prompt": prompts[i]}
        meta = os.path.join(root, f"{i:05d}", "metadata.jsonl")
        os.makedirs(os.path.dirname(meta), exist_ok=True)
        atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(rec) + "\n"))
        mine = [paths[(i, j)] for j in range(n)]
        if args.layout == "dpg" and all(os.path.isfile(p) for p in mine):
            grid = os.path.join(root, "grid_output", Path(rec["filename"]).stem + ".png")
            os.makedirs(os.path.dirname(grid), exist_ok=True)
            atomic_write(grid, lambda tmp: dpg_grid(mine).save(tmp, format="PNG"))


# -------------------------------------------------------------------------------------------------
# Running


def load_pipeline(args, ckpt, gemma, device, dtype, with_encoder=False):
    """SVGT2I.from_pretrained with the command line's per-file overrides; says what it loaded.
    with_encoder: also DINOv3 (editing; --dinov3 overrides)."""
    from svgt2i import SVGT2I, find_weights

    t0 = time.time()
    files = find_weights(ckpt, gemma, dit=args.dit, autoencoder=args.autoencoder, stats=args.stats)
    pipe = SVGT2I.from_pretrained(ckpt, gemma, device=device, dtype=dtype, dit=args.dit,
                                  autoencoder=args.autoencoder, stats=args.stats,
                                  dinov3=args.dinov3, with_encoder=with_encoder)
    if args.compile:
        pipe.compile()
    print(f"loaded {files['dit']} (+ autoencoder, statistics, Gemma) on {device} "
          f"({str(dtype).replace('torch.', '')}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return pipe


def reconstruct(args, ckpt, device):
    from svgt2i import find_weights, load_autoencoder, read_image

    if not args.out:
        raise UsageError("--reconstruct needs --out FILE.png")
    if not os.path.isfile(args.reconstruct):
        raise UsageError(f"image not found: {args.reconstruct}")
    image_paths(args, 1, 1)
    check_writable(os.path.dirname(args.out) or ".", "--out")
    image = read_image(args.reconstruct)
    files = find_weights(ckpt, autoencoder=args.autoencoder, dinov3=args.dinov3,
                         need=("autoencoder",))
    ae = load_autoencoder(files["autoencoder"], dinov3_path=files["dinov3"], device=device)
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

    if args.score < 1:
        raise UsageError("--score N needs N >= 1")
    if args.out:
        image_paths(args, 1, 1)
    pipe = load_pipeline(args, ckpt, gemma, device, dtype)
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
        sheet.save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return summary


def edit_inputs(args, prompts, height, width):
    """--init-image(s), --strength and --mask: (prompts, one init image path per prompt, the
    SVGT2I.generate keywords), checked before anything is loaded; (prompts, None, {}) without
    an init image."""
    from svgt2i import pair_edits, prepare_edit, read_image, read_images

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
    kw = dict(init_images=[im for _, im in pairs],
              strength=EDIT_STRENGTH if args.strength is None else args.strength)
    if args.mask:
        kw["mask"] = read_image(args.mask, "L")
    prepare_edit(len(prompts), height, width, args.steps, **kw)     # bad strength, mask size
    return prompts, [path for path, _ in pairs], kw


def plan(args, height, width):
    """Every image of the run as (image number k, prompt index, sample, prompt, path), the prompts'
    records, the prompts, n, the image paths, and the edit (edit_inputs); checked before any
    weights load."""
    prompts, records = list(args.prompt), None
    if args.prompts:
        if prompts:
            raise UsageError("use either --prompt or --prompts FILE, not both")
        prompts, records = read_prompts(args.prompts)
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    prompts, init_paths, edit = edit_inputs(args, prompts, height, width)
    if args.layout == "dpg" and not (records and all(isinstance(r, dict) and "filename" in r
                                                     for r in records)):
        raise UsageError("--layout dpg needs a .jsonl --prompts file whose records have a "
                         "\"filename\" (as DPG-Bench's dpg.jsonl)")
    n = args.n or (4 if args.layout in ("geneval", "dpg") else 1)
    end = len(prompts) if args.end is None else min(args.end, len(prompts))
    if args.start >= end:
        raise UsageError(f"--start {args.start}: there are only {len(prompts)} prompt(s)")
    paths, folder = image_paths(args, len(prompts), n)
    check_writable(folder, "--out" if args.out and args.layout == "flat" else "--outdir")
    jobs = [(i * n + j, i, j, prompts[i], paths[(i, j)]) for i in range(args.start, end)
            for j in range(n)]
    return jobs, records, prompts, n, paths, (init_paths, edit)


def run(args):
    check_numbers(args)
    import torch

    from svgt2i import pick_device

    ckpt, gemma = checkpoint_dirs(args)
    device = pick_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if (args.reconstruct or args.score is not None) and (args.enhance or args.init_image
                                                          or args.init_images or args.mask):
        raise UsageError("--enhance and the image-to-image flags do not apply to --reconstruct "
                         "or --score")
    if args.reconstruct:
        return reconstruct(args, ckpt, device)
    if args.enhance and args.system_prompt is None:
        from svgt2i import ENHANCE_SYSTEM_PROMPT
        args.system_prompt = ENHANCE_SYSTEM_PROMPT
    height, width = resolve_settings(args, ckpt)
    if args.score is not None:
        return score_toy(args, ckpt, gemma, device, dtype, height, width)
    jobs, records, prompts, n, paths, (init_paths, edit) = plan(args, height, width)

    # What is already drawn is kept: the same command completes an interrupted run
    seed = 42 if args.seed is None else args.seed
    settings = dict(height=height, width=width, **vars(sampling(args)),
                    dtype=args.dtype or str(dtype).replace("torch.", ""),
                    ckpt="toy" if args.toy and not args.ckpt else ckpt)
    if edit:
        settings.update(strength=edit["strength"], **({"mask": args.mask} if args.mask else {}))
    meta = {k: dict(prompt=p, seed=seed + k, **settings,
                    **({"init_image": init_paths[i]} if init_paths else {}))
            for k, i, _, p, _ in jobs}
    todo = jobs if args.overwrite else [job for job in jobs if not finished(job[4], meta[job[0]])]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} images already drawn: skipped "
              "(--overwrite redoes them)", file=sys.stderr)
    write_layout_files(args, records, prompts, sorted({i for _, i, _, _, _ in jobs}), n, paths)
    if not todo:
        return

    # Draw, batch by batch; each image is on disk as soon as its batch is decoded
    from runs import Progress

    pipe = load_pipeline(args, ckpt, gemma, device, dtype, with_encoder=bool(edit))
    print(f"seed {seed}", file=sys.stderr)
    enhanced = {}
    if args.enhance:     # each distinct prompt once, before any image
        enhanced = {p: pipe.enhance_prompt(p) for p in dict.fromkeys(p for _, _, _, p, _ in todo)}
        for p, e in enhanced.items():
            print(f"enhanced prompt: {p!r} -> {e!r}", file=sys.stderr)
    progress = Progress("images", len(todo))
    t0 = time.time()
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]

        def step(idx, i, N, start=start):
            progress(start, f" | step {i}/{N} of images {start + 1}-{start + len(batch)}")
        images_in = {"init_images": [edit["init_images"][i] for _, i, _, _, _ in batch],
                     **{k: v for k, v in edit.items() if k != "init_images"}} if edit else {}
        images = pipe.generate([enhanced.get(p, p) for _, _, _, p, _ in batch], height, width,
                               seed=[seed + k for k, *_ in batch], sampling=sampling(args),
                               batch_size=len(batch), offload=args.offload, progress=step,
                               **images_in)
        for (k, i, j, prompt, path), image in zip(batch, images):
            extra = {"enhanced_prompt": enhanced[prompt]} if prompt in enhanced else {}
            save_png(image, path, {**meta[k], **extra})
            print(path)
        progress(start + len(batch))
        write_layout_files(args, records, prompts, sorted({i for _, i, _, _, _ in batch}), n,
                           paths)
    print(f"{len(todo)} images in {time.time() - t0:.1f}s", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("sample.py: interrupted: the images written so far are whole; the same command "
              "draws the rest", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
