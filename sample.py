"""
Sample images from SVG-T2I.

    python sample.py --prompt "a cat on a sofa" --h 1024 --w 1024 --ckpt pre-trained \
        --gemma gemma-2-2b
    python sample.py --toy --prompt "two red circles on the left" --out shapes.png
    python sample.py --prompts geneval_metadata.jsonl --layout geneval --outdir eval/ --ckpt ...
    python sample.py --reconstruct in.png --out rec.png --ckpt pre-trained  # what the AE keeps
    python sample.py --toy --init-image in.png --strength 0.8 --prompt "two blue circles"
    python sample.py --prompt "a cat" --enhance --ckpt ...    # rewritten by Gemma-2 first

Every PNG carries its prompt, seed and sampler settings as PNG text metadata. Errors in the input
(sizes, files, prompt files) print one line and exit with code 2.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

# The official evaluation scripts look for the prompt under these fields, in this order.
PROMPT_FIELDS = ("refined_prompt", "prompt", "gpt_4_caption", "caption", "text", "description",
                 "query")


EDIT_STRENGTH = 0.8     # --strength's default (the README's toy measurement)


class UsageError(Exception):
    pass


def read_prompts(path):
    """A .txt file (one prompt per non-empty line) or a .jsonl file
    (one record per line with a prompt field). Returns (prompts, records); records are the parsed
    json lines (or None)."""
    if not os.path.isfile(path):
        raise UsageError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if not path.endswith(".jsonl"):
        prompts = [line.strip() for line in lines if line.strip()]
        return prompts, None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per "
                             "line") from None
        field = next((k for k in PROMPT_FIELDS if isinstance(rec, dict)
                      and isinstance(rec.get(k), str)), None)
        if field is None:
            raise UsageError(f"{path}:{n}: no prompt field; expected one of "
                             f"{', '.join(PROMPT_FIELDS)}")
        records.append(rec)
    prompts = [next(r[k] for k in PROMPT_FIELDS if isinstance(r.get(k), str)) for r in records]
    return prompts, records


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def png_info(settings):
    info = PngInfo()
    for k, v in settings.items():
        info.add_text(k, str(v))
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sample images from SVG-T2I.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts",
                   help="a .txt file (one prompt per line) or .jsonl file (a 'prompt' field per "
                        "line)")
    p.add_argument("--h", type=int, default=None,
                   help="image height in px, a multiple of 16 (default: the "
                   "checkpoint's training resolution, else 1024)")
    p.add_argument("--w", type=int, default=None,
                   help="image width in px, a multiple of 16 (default: as --h)")
    p.add_argument("--n", type=int, default=None,
                   help="images per prompt (default 1, or 4 with --layout geneval)")
    p.add_argument("--steps", type=int, default=None, help="model evaluations (default 50)")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale, 1 = off (default 4.0)")
    p.add_argument("--renorm", type=float, default=None,
                   help="clip ||guided|| to renorm * ||cond|| (0 = plain CFG)")
    p.add_argument("--cfg-trunc", type=float, default=None,
                   help="guide only while t < this (official semantics)")
    p.add_argument("--shift", type=float, default=None,
                   help="time shift (default 10, the official evaluation value)")
    p.add_argument("--solver", choices=["euler", "dpm"], default=None,
                   help="euler (the paper's sampler) or dpm (DPM-Solver++ 2M, the official "
                        "scripts' default)")
    p.add_argument("--seed", type=int, default=None,
                   help="image k uses seed + k (default: a random seed, printed)")
    p.add_argument("--negative", default=None,
                   help="negative prompt (default: empty, without system prompt)")
    p.add_argument("--system-prompt", default=None,
                   help="base (default), align, aesthetics, real, 4grid, empty, or a "
                   "literal")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint folder: the official pre-trained/ folder or a training "
                   "checkpoint (default: the bundled toy model with --toy)")
    p.add_argument("--gemma", default=None,
                   help="Gemma-2-2B folder (config.json, safetensors, tokenizer.model)")
    p.add_argument("--dit", default=None, help="override: DiT weights file")
    p.add_argument("--autoencoder", default=None, help="override: autoencoder checkpoint")
    p.add_argument("--dinov3", default=None,
                   help="override: DINOv3 weights (only for --reconstruct and editing)")
    p.add_argument("--stats", default=None, help="override: latent statistics file")
    p.add_argument("--toy", action="store_true", help="use the bundled toy model (assets/toy)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="DiT and Gemma dtype "
                   "(default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=1, help="images sampled together")
    p.add_argument("--offload", action="store_true",
                   help="move Gemma to the CPU once captions are encoded")
    p.add_argument("--out", default=None,
                   help="output PNG (with several images: name_00000.png, ...)")
    p.add_argument("--outdir", default=None, help="output folder (default: samples/)")
    p.add_argument("--layout", choices=["flat", "geneval"], default="flat",
                   help="geneval: {index:05d}/metadata.jsonl and {index:05d}/samples/{k:05d}.png")
    p.add_argument("--reconstruct", default=None, metavar="IMAGE",
                   help="encode and decode IMAGE with the autoencoder instead of sampling")
    p.add_argument("--init-image", default=None, metavar="IMAGE",
                   help="image-to-image: edit IMAGE with the prompt (fitted to the size, encoded, "
                        "noised to the --strength point, then sampled)")
    p.add_argument("--init-images", default=None, metavar="DIR",
                   help="edit every image of DIR (sorted by name), with one prompt for all or one "
                        "per image")
    p.add_argument("--strength", type=float, default=None,
                   help="the fraction of the steps an edit runs: 1 = text-to-image from the seed, "
                        f"0 = the autoencoder's reconstruction (default {EDIT_STRENGTH})")
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="edit only where MASK (an image the init image's size) is white, in "
                        "16-px tokens; black tokens are kept")
    p.add_argument("--enhance", action="store_true",
                   help="rewrite each prompt with Gemma-2 first (the official enhancer) and "
                        "condition on the 'align' system prompt (unless --system-prompt)")
    p.add_argument("--score", type=int, nargs="?", const=180, default=None, metavar="N",
                   help="toy model: generate N held-out prompts of the shapes world and print the "
                        "prompt-following "
                   "accuracy per category (--out saves a sheet of the images)")
    return p.parse_args(argv)


def output_paths(args, n_prompts, n):
    """Where image (prompt i, sample j) goes."""
    if args.layout == "geneval":
        root = args.outdir or "samples"
        return {(i, j): os.path.join(root, f"{i:05d}", "samples",
                                     f"{j:05d}.png") for i in range(n_prompts) for j in range(n)}
    if args.out and n_prompts * n == 1:
        return {(0, 0): args.out}
    if args.out:
        stem, ext = os.path.splitext(args.out)
        return {(i, j): f"{stem}_{i * n + j:05d}{ext or '.png'}"
                for i in range(n_prompts) for j in range(n)}
    root = args.outdir or "samples"
    return {(i, j): os.path.join(root, f"{i * n + j:05d}.png")
            for i in range(n_prompts) for j in range(n)}


def resolve_settings(args, ckpt):
    """Sampler settings: the command line, else the checkpoint's own defaults
    (run.json "sample", as the toy model has), else svgt2i.Sampling's. Returns the image
    (height, width): --h/--w, else the checkpoint's resolution, else 1024."""
    from svgt2i import Sampling, check_image_size, checkpoint_folder

    run_info = {}
    run_json = os.path.join(checkpoint_folder(ckpt), "run.json")
    if os.path.isfile(run_json):
        with open(run_json) as f:
            run_info = json.load(f)
    for k, v in {**vars(Sampling()), **run_info.get("sample", {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    height = args.h or run_info.get("resolution", 1024)
    width = args.w or height
    check_image_size(height, width)
    return height, width


def load_pipeline(args, ckpt, device, dtype, with_encoder=False):
    """SVGT2I.from_pretrained with the command line's per-file overrides; prints the load time.
    with_encoder: also DINOv3 (editing; --dinov3 overrides)."""
    from svgt2i import SVGT2I

    t0 = time.time()
    pipe = SVGT2I.from_pretrained(ckpt, args.gemma, device=device, dtype=dtype, dit=args.dit,
                                  autoencoder=args.autoencoder, stats=args.stats,
                                  dinov3=args.dinov3, with_encoder=with_encoder)
    print(f"loaded {ckpt} on {device} ({str(dtype).replace('torch.', '')}) in "
          f"{time.time() - t0:.1f}s", file=sys.stderr)
    return pipe


def sampler_kwargs(args, height, width):
    """The SVGT2I.generate arguments the command line sets, the same for every image."""
    from svgt2i import Sampling

    return dict(height=height, width=width,
                sampling=Sampling(**{k: getattr(args, k) for k in Sampling.names()}))


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


def score_toy(args, ckpt, device, dtype, height, width):
    """The toy model's prompt-following score: held-out prompts of the shapes world, seeds seed +
    k, each image read back by toy.score (count, colour, shape, position)."""
    import toy

    if args.score < 1:
        raise UsageError("--score N needs N >= 1")
    pipe = load_pipeline(args, ckpt, device, dtype)
    prompts = toy.heldout_prompts(args.score)
    seed = args.seed if args.seed is not None else 0
    t0 = time.time()
    images = pipe.generate(prompts, seed=seed, batch_size=max(args.batch_size, 30),
                           **sampler_kwargs(args, height, width))
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


def run(args):
    from svgt2i import find_weights, load_autoencoder

    import toy

    ckpt = args.ckpt or (toy.BUNDLE if args.toy else None)
    if ckpt is None:
        raise UsageError("no checkpoint: pass --ckpt pre-trained (the official release folder) "
                         "and --gemma, or --toy for the bundled toy model")
    device = pick_device(args.device)
    dtype = {"bf16": torch.bfloat16,
             "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]

    if args.reconstruct:
        if not args.out:
            raise UsageError("--reconstruct needs --out FILE.png")
        if not os.path.isfile(args.reconstruct):
            raise UsageError(f"image not found: {args.reconstruct}")
        files = find_weights(ckpt, autoencoder=args.autoencoder, dinov3=args.dinov3,
                             need=("autoencoder",))
        ae = load_autoencoder(files["autoencoder"], dinov3_path=files["dinov3"], device=device)
        if ae.encoder is None:
            raise UsageError("the autoencoder checkpoint has no encoder.* keys: pass --dinov3 "
                             "dinov3_vits16plus_pretrain_lvd1689m-*.pth")
        try:
            image = Image.open(args.reconstruct)
            image.load()
        except OSError as e:
            raise UsageError(f"cannot read image {args.reconstruct}: {e}") from None
        ae.reconstruct(image).save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
        return

    if args.enhance and args.system_prompt is None:
        from svgt2i import ENHANCE_SYSTEM_PROMPT
        args.system_prompt = ENHANCE_SYSTEM_PROMPT
    height, width = resolve_settings(args, ckpt)

    if args.score is not None:
        return score_toy(args, ckpt, device, dtype, height, width)

    prompts, records = list(args.prompt), None
    if args.prompts:
        file_prompts, records = read_prompts(args.prompts)
        if prompts and records:
            raise UsageError("use either --prompt or a .jsonl --prompts file, not both")
        prompts += file_prompts
    if not prompts:
        raise UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompts FILE")
    n = args.n or (4 if args.layout == "geneval" else 1)
    if n < 1 or args.steps < 1 or args.batch_size < 1:
        raise UsageError("--n, --steps and --batch-size must be positive")
    prompts, init_paths, edit = edit_inputs(args, prompts, height, width)

    pipe = load_pipeline(args, ckpt, device, dtype, with_encoder=bool(edit))
    enhanced = {}
    if args.enhance:     # each distinct prompt once, before any image
        enhanced = {p: pipe.enhance_prompt(p) for p in dict.fromkeys(prompts)}
        for p, e in enhanced.items():
            print(f"enhanced prompt: {p!r} -> {e!r}", file=sys.stderr)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    print(f"seed {seed}", file=sys.stderr)

    all_prompts = [p for p in prompts for _ in range(n)]    # image k: prompt k // n, sample k % n
    paths = output_paths(args, len(prompts), n)
    settings = dict(steps=args.steps, cfg=args.cfg, renorm=args.renorm, cfg_trunc=args.cfg_trunc,
                    shift=args.shift, solver=args.solver, negative=args.negative,
                    system_prompt=args.system_prompt, height=height, width=width,
                    dtype=args.dtype or str(dtype).replace("torch.", ""), ckpt=ckpt)

    def progress(idx, i, N):
        print(f"\rimages {idx[0] + 1}-{idx[-1] + 1}/{len(all_prompts)}  step {i}/{N}",
              end="" if i < N else "\n", file=sys.stderr, flush=True)

    if edit:
        edit["init_images"] = [im for im in edit["init_images"] for _ in range(n)]
        settings.update(strength=edit["strength"], **({"mask": args.mask} if args.mask else {}))

    t0 = time.time()
    images = pipe.generate([enhanced.get(p, p) for p in all_prompts], seed=seed,
                           batch_size=args.batch_size, offload=args.offload, progress=progress,
                           **sampler_kwargs(args, height, width), **edit)
    for k, image in enumerate(images):
        i, j = divmod(k, n)
        path = paths[(i, j)]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        meta = dict(prompt=prompts[i], seed=seed + k, **settings)
        if prompts[i] in enhanced:
            meta["enhanced_prompt"] = enhanced[prompts[i]]
        if init_paths:
            meta["init_image"] = init_paths[i]
        image.save(path, pnginfo=png_info(meta))
        print(path)
    if args.layout == "geneval":
        for i, prompt in enumerate(prompts):
            rec = records[i] if records else {"prompt": prompt}
            with open(os.path.join(args.outdir or "samples", f"{i:05d}", "metadata.jsonl"),
                      "w") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"{len(images)} images in {time.time() - t0:.1f}s", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
