"""
Sample images from SVG-T2I.

    python sample.py --prompt "a cat on a sofa" --h 1024 --w 1024   # the release in ./pre-trained
    python sample.py --toy --prompt "two red circles on the left" --out shapes.png
    python sample.py --prompts geneval_metadata.jsonl --layout geneval --outdir geneval/
    python sample.py --prompts dpg.jsonl --layout dpg --outdir dpg/ --start 0 --end 266
    python sample.py --reconstruct in.png --out rec.png             # what the autoencoder keeps
    python sample.py --toy --init-image in.png --strength 0.8 --prompt "two blue circles"
    python sample.py --prompt "a cat" --enhance                    # rewritten by Gemma-2 first
    python sample.py --prompt "a cat" --lora runs/cats/lora.safetensors:0.8  # a fine-tune's LoRA

Each image is written as soon as its batch is decoded (under a temporary name, then renamed), so an
interrupted run keeps every image it finished, and running the same command again completes it.
Every PNG carries its prompt, seed and sampler settings as text metadata. Mistakes in the input
(sizes, numbers, devices, files, output locations) print one line and exit with code 2 before any
weights load. torch is imported only once the arguments are read, so --help is instant. The jobs
around the sampling (prompt files, layouts, reruns, checks) are in plumbing/jobs.py.
"""

import argparse
import sys
import time

from plumbing import jobs


def parse_args(argv=None):
    """Every flag with a short help; the toy's numbers are read from its bundle's run.json."""
    toy = jobs.toy_defaults()
    p = argparse.ArgumentParser(description="Sample images from SVG-T2I. Sampler defaults: the "
                                "official evaluation settings, or a checkpoint's own (the toy's).")
    add = p.add_argument_group("what to draw").add_argument
    add("--prompt", action="append", default=[], help="a prompt (repeatable)")
    add("--prompts", help="a prompt file: .txt (a prompt a line), .jsonl or .json")
    add("--h", type=int, help="image height in px, a multiple of 16 (default: the checkpoint's "
        "resolution, else 1024)")
    add("--w", type=int, help="image width in px, a multiple of 16 (default: as --h)")
    add("--n", type=int, help="images per prompt (default 1; 4 for geneval and dpg)")
    add("--seed", type=int, help="image k starts from noise seeded seed + k (default 42, the "
        "official seed; --score: 0)")
    add("--start", type=int, default=0, help="first prompt index to draw (default 0)")
    add("--end", type=int, help="prompt index to stop before (default: all)")
    add("--enhance", action="store_true", help="rewrite each prompt with Gemma-2 first, "
        "conditioned on 'align' (unless --system-prompt)")
    add = p.add_argument_group("image-to-image").add_argument
    add("--init-image", metavar="IMAGE", help="edit IMAGE with the prompt")
    add("--init-images", metavar="DIR", help="edit every image of DIR, by name")
    add("--strength", type=float, help=f"how much an edit redraws (default {jobs.EDIT_STRENGTH})")
    add("--mask", metavar="MASK", help="edit only where MASK is white (in 16-px tokens)")
    add = p.add_argument_group("sampler").add_argument
    add("--steps", type=int, help=f"model evaluations (default 50; --toy {toy['steps']})")
    add("--cfg", type=float, help=f"guidance scale, 1 = off (default 4.0; --toy {toy['cfg']})")
    add("--shift", type=float, help=f"time shift, > 0 (default 10.0; --toy {toy['shift']})")
    add("--solver", choices=["euler", "dpm"], help="Euler or DPM-Solver++ 2M (default euler)")
    add("--renorm", type=float, help="clip ||guided|| to renorm * ||cond||, 0 = off (default 1.0)")
    add("--cfg-trunc", type=float, help="guide only while t < this (default 100.0)")
    add("--negative", help="negative prompt (default: empty, without system prompt)")
    add("--system-prompt", help=f"{', '.join(jobs.SYSTEM_PROMPT_NAMES)}, or text:YOUR PROMPT "
        "(default base; --toy empty)")
    add = p.add_argument_group("weights (nothing is downloaded)").add_argument
    add("--ckpt", help="checkpoint folder: the release's pre-trained/ or a training checkpoint "
        "(default: ./pre-trained)")
    add("--gemma", help="Gemma-2-2B folder (default: ./gemma-2-2b, else in ./pre-trained)")
    add("--toy", action="store_true", help="the bundled toy model (assets/toy), with its own "
        f"sampler defaults: {toy['steps']} steps, cfg {toy['cfg']}, shift {toy['shift']}, "
        f"{toy['solver']}, {toy['system_prompt']} system prompt, {toy['resolution']} px")
    add("--dit", help="override: DiT weights file")
    add("--autoencoder", help="override: autoencoder checkpoint")
    add("--dinov3", help="override: DINOv3 weights (--reconstruct and editing)")
    add("--stats", help="override: latent statistics file")
    add("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a LoRA of "
        "train.py --lora into the DiT, at SCALE (default 1); repeatable")
    add = p.add_argument_group("system").add_argument
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    add("--dtype", choices=["bf16", "fp32"], help="DiT and Gemma dtype (default: bf16 on GPU)")
    add("--batch-size", type=int, default=1, help="images sampled together (default 1)")
    add("--offload", action="store_true", help="move Gemma to the CPU once it has encoded")
    add("--compile", action="store_true", help="torch.compile each DiT block")
    add = p.add_argument_group("output").add_argument
    add("--out", help="output .png (with several images: NAME_00000.png, ...)")
    add("--outdir", help="output folder (default: samples/)")
    add("--layout", choices=["flat", "geneval", "dpg"], default="flat",
        help="flat: OUTDIR/{k:05d}.png; geneval, dpg: the benchmarks' folders (default flat)")
    add("--overwrite", action="store_true", help="redo the images a rerun would skip, and "
        "replace files in their place that sample.py did not draw")
    add("--reconstruct", metavar="IMAGE", help="encode and decode IMAGE instead of sampling")
    add("--score", type=int, nargs="?", const=180, metavar="N", help="toy model: the "
        "prompt-following score of N held-out prompts (default 180)")
    return p.parse_args(argv)


def main(argv=None):
    """Draw the images the command line asks for, batch by batch; each PNG is on disk as soon as
    its batch is decoded."""
    args = parse_args(argv)
    with jobs.exit_codes():     # bad input: one line, exit code 2; Ctrl-C: exit code 130
        # Setup: the numbers checked, then torch, the device, the dtype, where the weights are
        jobs.check_numbers(args)
        import torch

        from plumbing.cli import pick_device
        from plumbing.runs import Progress
        from svgt2i import SVGT2I

        ckpt, gemma = jobs.checkpoint_dirs(args)       # --ckpt, --toy or ./pre-trained
        device = pick_device(args.device)
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
            args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        jobs.check_modes(args)
        if args.reconstruct:        # no sampling: what the autoencoder keeps of an image
            return jobs.reconstruct(args, ckpt, device)

        # The sampler settings: the flags, else the checkpoint's run.json, else Sampling's
        height, width = jobs.resolve_settings(args, ckpt)
        sampling = jobs.sampling(args)
        if args.score is not None:      # the toy's prompt-following score, not images
            return jobs.score_toy(args, ckpt, gemma, device, dtype, height, width)

        # Prompts: every image of the run (a Job: prompt, seed, path, PNG metadata), checked
        # before any weights load; a rerun skips the images already drawn
        plan = jobs.plan_images(args, ckpt, dtype, height, width)
        jobs.write_layout_files(args, plan, plan.jobs)  # geneval's and dpg's metadata.jsonl
        if not plan.todo:
            return

        # The pipeline: the DiT, the autoencoder (+ DINOv3 to edit), latent statistics, Gemma-2
        t0 = time.time()
        pipe = SVGT2I.from_pretrained(ckpt, gemma, device=device, dtype=dtype,
                                      with_encoder=bool(plan.edit), **jobs.weight_flags(args))
        if args.compile:
            pipe.compile()              # each DiT block; the first step compiles
        jobs.say_loaded(pipe, device, dtype, t0)
        print(f"seed {plan.seed}", file=sys.stderr)
        if args.enhance:                # each distinct prompt rewritten by Gemma-2, once
            jobs.enhance_prompts(pipe, plan.todo)

        # Draw, batch by batch; each image is on disk as soon as its batch is decoded
        progress = Progress("images", len(plan.todo))
        t0 = time.time()
        for start in range(0, len(plan.todo), args.batch_size):
            batch = plan.todo[start:start + args.batch_size]
            images = pipe.generate([job.text for job in batch], height, width,
                                   seed=[job.seed for job in batch], sampling=sampling,
                                   batch_size=len(batch), offload=args.offload,
                                   progress=jobs.step_progress(progress, start, len(batch)),
                                   **plan.edit_of(batch))
            for job, image in zip(batch, images):
                jobs.save_png(image, job.path, job.meta)     # atomic: whole or absent
                print(job.path)
            progress(start + len(batch))
            jobs.write_layout_files(args, plan, batch)      # dpg's grid once a prompt is done
        print(f"{len(plan.todo)} images in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
