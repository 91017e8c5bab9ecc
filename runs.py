"""
What every training run shares (train.py for the DiT, train_autoencoder.py for the decoder): this
process's place in the run (rank, world size, device, the collectives, logging), the run folder
(stale files cleared, atomic checkpoints, exact resume of every generator), stopping on a signal,
and latent statistics summed over ranks.

    d = Dist.start("auto")                 # torchrun's environment -> rank, world, device
    out = open_run(args.out, args.resume, d)
    ... save_checkpoint(out, step, write, keep) ... resume_folder("latest", out) ...
"""

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import Positions, accumulate_stats, collate
from svgt2i import atomic_write, checkpoint_folder


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""



class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: None means the stage or model preset decides."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)



# -------------------------------------------------------------------------------------------------
# This process's place in the run: rank, world, device, the collectives, and logging


@dataclasses.dataclass
class Dist:
    """Rank and world size (from torchrun's environment), the device, and rank-aware logging."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    log_file: Path | None = None

    @classmethod
    def start(cls, device="auto"):
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device == "auto":
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, device)

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, t, op=dist.ReduceOp.SUM):
        """Reduce a tensor over ranks (on a device the backend takes); returns the
        result on the CPU."""
        if self.world == 1:
            return t
        t = t.to(self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return t.cpu()

    def all_sum(self, x):
        return type(x)(self.all_reduce(torch.tensor([float(x)], dtype=torch.float64)).item())

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def log(self, msg, every_rank=False, end="\n"):
        """Rank 0 prints to stdout and appends OUT/log.txt; `every_rank` lines (warnings)
        go to stderr."""
        if not (self.main or every_rank):
            return
        prefix = f"[rank {self.rank}] " if self.world > 1 and every_rank else ""
        print(prefix + msg, end=end, file=sys.stderr if every_rank else sys.stdout, flush=True)
        if self.log_file is not None and end == "\n" and self.main:
            with open(self.log_file, "a") as f:
                f.write(prefix + msg + "\n")

    def warn(self, msg):
        self.log(msg, every_rank=True)



# -------------------------------------------------------------------------------------------------
# The run folder: atomic checkpoints, exact resume

def open_run(out, resume, d):
    """The run folder OUT/, created, with stale temporary files of a killed run removed; refused
    if it holds a run and `resume` is not asked for. Rank 0 logs to OUT/log.txt from here on."""
    out = Path(out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp*"):       # something being written when the last run died
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    d.barrier()
    if resume is None and (out / "latest").is_file():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose "
                         "another --out")
    d.log_file = out / "log.txt"
    return out


def save_checkpoint(out, step, write, keep):
    """OUT/ckpt-{step:07d}/, written by write(folder) into a temporary folder and renamed, whole or
    not at all (svgt2i.atomic_write); then OUT/latest names it and all but the last `keep`
    checkpoints are removed (0: keep all). Rank 0 only."""
    name = f"ckpt-{step:07d}"

    def write_folder(tmp):
        tmp.mkdir()
        write(tmp)
    final = atomic_write(out / name, write_folder)
    atomic_write(out / "latest", lambda tmp: tmp.write_text(name + "\n"))
    if keep > 0:
        older = sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p != final)
        for old in older[:-keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resume_folder(arg, out):
    """--resume [DIR]: 'latest' -> OUT's newest checkpoint; a run folder -> its newest; a
    checkpoint as is."""
    if arg == "latest" and not (out / "latest").is_file():
        raise UsageError(f"--resume: nothing to resume in {out} (no 'latest' file): drop --resume "
                         "to start a run")
    folder = Path(checkpoint_folder(str(out if arg == "latest" else arg)))
    if not (folder / "state.pt").is_file():
        raise UsageError(f"--resume: {folder} is not a training checkpoint (no state.pt)")
    return folder


def load_fitting(model, sd, source, d):
    """--init-from: load what fits, tensors with the model's names and shapes; mis-shaped and
    unknown ones are dropped and missing ones left at their init, each group named in a warning
    (upstream's init: strict=False after dropping mis-shaped keys). Returns the keys loaded."""
    own = model.state_dict()
    fits = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fits:
        raise UsageError(f"{source}: no tensor matches the model (is it a checkpoint of this "
                         "model, of this size?)")
    misshaped = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                 if k in own and k not in fits]
    unknown = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    for what, keys in (("mis-shaped (dropped)", misshaped), ("unknown (dropped)", unknown),
                       ("missing (left at init)", missing)):
        if keys:
            more = " ..." if len(keys) > 6 else ""
            d.log(f"warning: {source}: {len(keys)} {what}: {', '.join(keys[:6])}{more}")
    model.load_state_dict(fits, strict=False)
    d.log(f"initialised {len(fits)}/{len(own)} tensors from {source}")
    return set(fits)


def batch_plan(args, d):
    """(images per rank and step, micro-batches per step): global batch = ranks x accumulation x
    micro-batch; args.micro_batch defaults to the whole local batch."""
    local = args.global_batch // d.world
    if args.global_batch % d.world:
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by the world size "
                         f"{d.world}")
    args.micro_batch = args.micro_batch or local
    if args.micro_batch < 1 or local % args.micro_batch:
        raise UsageError(f"--global-batch {args.global_batch} = {d.world} ranks x {local}, and "
                         f"{local} is not a multiple of --micro-batch {args.micro_batch}")
    return local, local // args.micro_batch


def data_stream(args, d, dataset, position, steps):
    """This rank's micro-batches (lists of dataset items) for the next `steps` steps, from global
    position `position` on: data.Positions over the dataset's records, seeded by (args.seed,
    args.resolution), args.micro_batch items at a time, args.workers loader processes."""
    sampler = Positions(len(dataset), args.seed, args.resolution, position, steps,
                        args.global_batch, d.rank, d.world)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, sampler=sampler,
                                            num_workers=args.workers, collate_fn=collate,
                                            prefetch_factor=4 if args.workers else None))


def absolute_paths(args, names):
    """Make the path arguments `names` (and --resume DIR) absolute: a run can change directory."""
    for name in names:
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if args.resume and args.resume != "latest":
        args.resume = os.path.abspath(args.resume)
    return args


def run_state(d, counters, skipped, **extra):
    """What a checkpoint's state.pt holds, gathered from every rank (all ranks call it): the
    counters, the world size, each rank's generators and skipped-image count. None off rank 0."""
    per_rank = d.gather((rng_state(d.device), skipped))
    if not d.main:
        return None
    return {**counters, **extra, "world_size": d.world, "rng": [r for r, _ in per_rank],
            "skipped": [n for _, n in per_rank]}


def restore_run_state(folder, d):
    """A checkpoint's state.pt, with this rank's generators restored when the world size is the
    same (nothing of the training itself depends on them). Returns (state, this rank's skipped
    count: rank 0 carries the total when the world size changed)."""
    state = torch.load(Path(folder) / "state.pt", weights_only=True)
    skipped = sum(state["skipped"]) if d.main else 0
    if state["world_size"] == d.world:
        set_rng_state(state["rng"][d.rank], d.device)
        skipped = state["skipped"][d.rank]
    d.log(f"resumed from {folder} at step {state['step']}")
    return state, skipped


def warn_skipped(items, records, warned, d):
    """Warn once per unreadable record the dataset skipped (items carry "skipped": [(record,
    reason)]); returns how many skips the items carry."""
    n = 0
    for it in items:
        for i, reason in it["skipped"]:
            n += 1
            if i not in warned:
                warned.add(i)
                d.warn(f"warning: skipped {records.where(i)} ({reason})")
    return n


@contextlib.contextmanager
def command_line(name):
    """The entry points' error rule: bad input (UsageError, ValueError, FileNotFoundError) is one
    line `NAME: error: ...` on stderr (rank-prefixed under torchrun) and exit code 2; the process
    group is closed either way."""
    try:
        yield
    except (UsageError, ValueError, FileNotFoundError) as e:
        world = int(os.environ.get("WORLD_SIZE", 1))
        prefix = f"[rank {os.environ.get('RANK')}] " if world > 1 else ""
        print(f"{prefix}{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rng_state(device):
    """This process's generators as plain Python values (lists of ints), which pickle through
    all_gather_object and load with torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), *(int(x) if i != 2 else float(x)
                                                         for i, x in enumerate(np_state[2:]))]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def check_replicas(model, d):
    """All ranks hold bit-identical weights (DDP guarantees it; this proves it at every
    checkpoint): per- parameter sums of the raw bits (fp32 as int32, summed in int64), so any
    differing bit shows."""
    if d.world == 1:
        return
    fp = torch.stack([p.detach().float().contiguous().view(torch.int32).sum(dtype=torch.int64)
                      for p in model.parameters()])
    prints = d.gather(fp.cpu())
    bad = [r for r in range(d.world) if not torch.equal(prints[r], prints[0])]
    if bad:
        raise RuntimeError(f"model replicas diverged: ranks {bad} differ from rank 0")
    d.log(f"replicas identical on {d.world} ranks")


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (sent by schedulers before preemption, forwarded by torchrun) or SIGUSR1: finish the
    step, save, stop. Yields a dict whose "signal" is set when one arrived."""
    stop, old = {"signal": None}, {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum))
               for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def fmt_time(s):
    d, s = divmod(int(s), 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# -------------------------------------------------------------------------------------------------
# Latent statistics of the data, summed over ranks


def compute_stats(d, records, indices, crops, encode_images, cache, batch, path):
    """Per-channel mean/std of the DINOv3 features of records[indices] (as cropped for training;
    each rank reads its share of `indices`), summed over ranks, saved in the official format
    ({'mean', 'std'}: [1, C]) to `path` by rank 0."""
    acc = accumulate_stats(records, indices[d.rank::d.world], crops, encode_images, cache, batch,
                           d.warn)
    # ranks without data still join: the channel count is agreed on first
    C = int(d.all_reduce(torch.tensor([0 if acc.sum is None else acc.sum.numel()]),
                         op=dist.ReduceOp.MAX))
    vec = torch.zeros(1 + 2 * C, dtype=torch.float64)
    if acc.sum is not None:
        vec[0], vec[1:1 + C], vec[1 + C:] = float(acc.n), acc.sum, acc.sumsq
    vec = d.all_reduce(vec)
    acc.n, acc.sum, acc.sumsq = int(vec[0]), vec[1:1 + C].clone(), vec[1 + C:].clone()
    if acc.n == 0:
        raise UsageError(f"cannot compute latent statistics: none of {len(indices)} images could "
                         "be read (pass --stats FILE)")
    if d.main:
        atomic_write(path, lambda tmp: torch.save(acc.state(), tmp))
    d.barrier()
