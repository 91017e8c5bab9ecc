"""
The command line's rules: bad input is one line `NAME: error: ...` and exit code 2 (never a deep
traceback), the flags both trainers share, paths made absolute, and the device a flag names.

You need not read this to learn SVG-T2I.
"""

import argparse
import contextlib
import json
import math
import os
import sys

from plumbing import UsageError

# Sizes no machine runs, refused before any work (the paper trains at up to 1024 px, with global
# batches of up to 1536): a run asking for more is a typo, and would grow for minutes first
MAX_RESOLUTION = 4096
MAX_GLOBAL_BATCH = 65536
MAX_MICRO_BATCH = 4096


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: None means the stage or model preset decides."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_system_args(p):
    """The flags both trainers share for where a run computes and how often it writes; the group,
    for a trainer's own system flags."""
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto",
                   help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    g.add_argument("--workers", type=int, default=None,
                   help="data loader processes per rank (default: up to 4)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per rank for torch (default, 0: torch's choice)")
    g.add_argument("--save-every", type=int, default=None,
                   help="checkpoint interval in steps (default 2000)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (0: all)")
    g.add_argument("--log-every", type=int, default=None,
                   help="log interval in steps (default 10)")
    return g


def number_list(value):
    """A flag of comma-separated numbers ("0.9,0.999") as a tuple, () if one is not a number; a
    value already parsed (a tuple) as it is."""
    if not isinstance(value, str):
        return tuple(value)
    try:
        return tuple(float(x) for x in value.split(","))
    except ValueError:
        return ()


def check_run_numbers(args):
    """The numbers both trainers share: every float finite, --grad-clip 0 (off) or positive,
    counts in range, sizes a machine can run."""
    for name, v in sorted(vars(args).items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a finite number")
    if args.grad_clip < 0:
        raise UsageError(f"--grad-clip {args.grad_clip}: the largest gradient norm must be "
                         "positive (0: no clipping)")
    if not 0 <= args.lr <= 1:
        raise UsageError(f"--lr {args.lr}: Adam's step size must lie in [0, 1]")
    for name, least in (("threads", 0), ("workers", 0), ("keep", 0), ("micro_batch", 1)):
        v = getattr(args, name)
        if v is not None and v < least:
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be at least {least}")
    for name, most in (("resolution", MAX_RESOLUTION), ("global_batch", MAX_GLOBAL_BATCH),
                       ("micro_batch", MAX_MICRO_BATCH)):
        v = getattr(args, name)
        if v is not None and v > most:
            raise UsageError(f"--{name.replace('_', '-')} {v}: at most {most} (no machine runs "
                             "more)")


def check_config(base, overrides, flag, build, fixed=()):
    """A --*-config JSON object of overrides of the config `base`: known fields (not `fixed`), each
    of its default's type (ints at least 1, or 0 for a count of blocks; tuples of positive ints),
    and a model build(config) can make (built on the meta device: no memory). Returns them."""
    import dataclasses

    import torch
    cls = type(base)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown, taken = sorted(set(overrides) - set(fields)), sorted(set(overrides) & set(fixed))
    if unknown:
        raise UsageError(f"{flag}: unknown {cls.__name__} fields {unknown}")
    if taken:
        raise UsageError(f"{flag}: {cls.__name__} fields {taken} follow the frozen encoders: "
                         "leave them out")
    for name, v in overrides.items():
        default = fields[name].default
        least = 0 if "res_blocks" in name or "refiner" in name else 1
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= least
              if isinstance(default, int) else
              isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
              if isinstance(default, float) else
              isinstance(v, list) and len(v) > 0 and all(
                  isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
              if isinstance(default, tuple) else True)
        if not ok:
            kind = ("a whole number >= {}".format(least) if isinstance(default, int) else
                    "a positive number" if isinstance(default, float) else
                    "a non-empty list of positive whole numbers")
            raise UsageError(f"{flag}: {name} {json.dumps(v)}: must be {kind} (default "
                             f"{json.dumps(default)})")
    try:
        with torch.device("meta"):
            build(dataclasses.replace(base, **overrides))
    except Exception as e:
        raise UsageError(f"{flag} {json.dumps(overrides)}: no model of that shape "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
                         ) from None
    return overrides


@contextlib.contextmanager
def command_line(name):
    """The entry points' error rule: bad input (UsageError, ValueError, any OSError: a missing
    file, a full disk) is one line `NAME: error: ...` on stderr (rank-prefixed under torchrun; a
    usage error, which every rank meets, said by rank 0 only) and exit code 2; the process group
    is closed either way."""
    try:
        yield
    except (UsageError, ValueError, OSError) as e:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if rank == 0 or not isinstance(e, UsageError):   # every rank has a usage error: say it once
            prefix = f"[rank {rank}] " if world > 1 else ""
            print(f"{prefix}{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        # a process group exists only if torch.distributed was imported (sample.py checks its
        # arguments before torch is imported at all)
        torch_dist = sys.modules.get("torch.distributed")
        if torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def absolute_paths(args, names):
    """Make the path arguments `names` (and --resume DIR) absolute: a run can change directory."""
    for name in names:
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.resume and args.resume != "latest":
        args.resume = os.path.abspath(args.resume)
    return args


def check_train_args(args, stages):
    """train.py's flags, checked once, here where they enter (its stage preset already filled in):
    --caption-ratios becomes a tuple, --model-config a dict of NextDiTConfig fields, paths
    absolute. Each bad value is a one-line UsageError."""
    from nextdit import PRESETS, NextDiT, NextDiTConfig
    from plumbing.files import json_object
    if not args.data or not args.out:
        raise UsageError("--data FILE.jsonl and --out DIR are required (the toy model: python "
                         "toy.py train)")
    if args.stage not in stages:
        raise UsageError(f"--stage {args.stage}: choose 1, 2, 3 or 4 (Table 4)")
    if args.model not in PRESETS:
        raise UsageError(f"--model {args.model!r}: choose one of {', '.join(PRESETS)}")
    ratios = args.caption_ratios = number_list(args.caption_ratios)
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise UsageError("--caption-ratios: three non-negative numbers short,middle,long, e.g. "
                         "0.1,0.35,0.55")
    if args.resolution < 32 or args.resolution % 16:
        raise UsageError(f"--resolution {args.resolution}: use a multiple of 16 (256, 512, 1024)")
    if args.max_text_len < 8 or args.max_text_len % 8 or args.max_text_len > 592:
        raise UsageError(f"--max-text-len {args.max_text_len}: use a multiple of 8 up to 592 (the "
                         "DiT's RoPE covers 600 caption positions)")
    for name in ("steps", "global_batch", "stats_images", "save_every", "log_every"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    for name in ("caption_dropout", "zh_ratio"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if not 0 <= args.ema_decay < 1:
        raise UsageError("--ema-decay must lie in [0, 1)")
    if args.model_config is not None:        # (run.json records None when not given)
        args.model_config = json_object(args.model_config, "--model-config",
                                        "NextDiTConfig fields, e.g. '{\"n_layers\": 8}'")
    check_run_numbers(args)
    check_lora_args(args)
    check_config(NextDiTConfig.from_name(args.model), args.model_config or {}, "--model-config",
                 NextDiT, fixed=("in_channels", "cap_feat_dim"))     # (they follow the encoders)
    return absolute_paths(args, ("data", "out", "autoencoder", "dinov3", "gemma", "stats", "cache",
                                 "init_from"))


def check_lora_args(args):
    """train.py --lora RANK and its flags: a positive rank, alpha > 0 (default: the rank), known
    target names (a list after this), a base to fine-tune, DDP."""
    from nextdit import LORA_OPTIONAL, LORA_TARGETS
    if args.lora is None:
        if args.lora_alpha is not None or args.lora_targets != ",".join(LORA_TARGETS):
            raise UsageError("--lora-alpha and --lora-targets go with --lora RANK")
        return
    if not 1 <= args.lora <= 4096:
        raise UsageError(f"--lora {args.lora}: the adapters' rank must be a positive integer "
                         "(e.g. 16)")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora)
    if args.lora_alpha <= 0:
        raise UsageError(f"--lora-alpha {args.lora_alpha}: must be positive (the update's scale "
                         "is alpha / rank)")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LORA_TARGETS + LORA_OPTIONAL]
    if unknown or not targets:
        raise UsageError(f"--lora-targets {args.lora_targets!r}: "
                         f"{'unknown ' + repr(unknown[0]) if unknown else 'empty'}; choose among "
                         f"{', '.join(LORA_TARGETS + LORA_OPTIONAL)}")
    args.lora_targets = list(dict.fromkeys(targets))
    if not args.init_from:
        raise UsageError("--lora needs --init-from: the DiT to fine-tune (the release's "
                         "consolidated*.pth, or a run of ours)")
    if args.parallel == "fsdp":
        raise UsageError("--lora with --parallel fsdp: not supported; the frozen base in bf16 (5.2 GB "
                         "for the 2B model) fits each GPU: use the default --parallel ddp")


def check_autoencoder_args(args, stages, recipe):
    """train_autoencoder.py's flags: those left unset take the stage's preset and the recipe; then
    each is checked once, here where it enters (one-line UsageErrors); --decoder-config and
    --residual-config become dicts of their config's fields; paths absolute."""
    from data import crops_for
    from decoder import Decoder, DecoderConfig, ResidualViT, ResidualViTConfig
    from plumbing.files import json_object
    if args.eval and (not args.data or not args.ckpt):
        raise UsageError("--eval needs --data (a folder or .jsonl of images) and --ckpt")
    if not args.eval and (not args.data or not args.out):
        raise UsageError("--data (a folder of images or a .jsonl) and --out DIR are required")
    if args.stage not in stages:
        raise UsageError(f"--stage {args.stage}: choose 1, 2 or 3 (Table 3)")
    for k, v in dict(stages[args.stage], **recipe).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.resolution % 16:
        raise UsageError(f"--resolution {args.resolution}: use a multiple of 16 (256, 512, 1024)")
    for name in ("steps", "global_batch", "save_every", "log_every", "limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    args.betas = number_list(args.betas)
    if len(args.betas) != 2 or not all(0 <= b < 1 for b in args.betas):
        raise UsageError("--betas: two numbers in [0, 1), e.g. 0.9,0.999")
    for name in ("perceptual_weight", "disc_weight", "disc_start", "stats_images", "l2_weight"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative")
    check_run_numbers(args)
    if args.resolution < 32 or (args.crops == "buckets" and min(map(min, crops_for(
            args.resolution))) < 32):
        raise UsageError(f"--resolution {args.resolution} --crops {args.crops}: the "
                         "discriminator needs crops of at least 32 px a side: use --resolution "
                         f">= {32 if args.crops == 'fixed' else 64}")
    for name, base, build in (("decoder_config", DecoderConfig(), Decoder),
                              ("residual_config", ResidualViTConfig(), ResidualViT)):
        flag = "--" + name.replace("_", "-")
        overrides = json_object(getattr(args, name), flag, "fields, e.g. '{\"ch\": 64}'")
        # z_channels follows the encoders
        setattr(args, name, check_config(base, overrides, flag, build, fixed=("z_channels",)))
    return absolute_paths(args, ("data", "out", "init_from", "dinov3", "vgg", "lpips", "ckpt"))


def pick_device(name="auto", index=0):
    """--device: auto (cuda:index when a GPU is visible, else cpu), cpu, cuda, cuda:N or mps.
    Anything else, or a device this machine lacks, is a one-line ValueError."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{index}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") \
            from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(f"--device {name}: no CUDA GPU is visible here{build}: use --device "
                             "cpu")
        i = index if device.index is None else device.index
        if i >= n:
            raise ValueError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to "
                             f"cuda:{n - 1}")
        return torch.device("cuda", i)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: Apple's MPS is not available here: use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: {device.type} devices are not supported: use auto, "
                         "cpu, cuda, cuda:N or mps")
    return device
