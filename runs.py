"""
What every training run shares (train.py for the DiT, train_autoencoder.py for the decoder): this
process's place in the run (rank, world size, device, the collectives, logging), the run folder
(stale files cleared, atomic checkpoints, exact resume of every generator), stopping on a signal,
sharded training (FSDP2: the mesh, the wrapping, full files streamed from shards, checkpoints that
reshard on load), and latent statistics summed over ranks.

    d = Dist.start("auto")                 # torchrun's environment -> rank, world, device
    out = open_run(args.out, args.resume, d)
    ... save_checkpoint(out, step, write, keep) ... resume_folder("latest", out) ...
"""

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import Positions, accumulate_stats, collate
from svgt2i import atomic_write, pick_device


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""



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
                   help="CPU threads per rank for torch (default: torch's choice)")
    g.add_argument("--save-every", type=int, default=None,
                   help="checkpoint interval in steps (default 2000)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (0: all)")
    g.add_argument("--log-every", type=int, default=None,
                   help="log interval in steps (default 10)")
    return g



# -------------------------------------------------------------------------------------------------
# This process's place in the run: rank, world, device, the collectives, and logging


@dataclasses.dataclass
class Dist:
    """Rank and world size (from torchrun's environment), the device, and rank-aware logging."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    log_file: Path | None = None
    lock: object = None               # rank 0's lock on the run folder (runs.lock_folder)
    mesh: object = None               # the device mesh, when anything is sharded (device_mesh)

    @classmethod
    def start(cls, device="auto"):
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device = pick_device(device, index=int(os.environ.get("LOCAL_RANK", 0)))
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

    def record(self, out, line, rec):
        """A progress report: rank 0 prints `line` and appends `rec` to OUT/log.jsonl."""
        if self.main:
            self.log(line)
            with open(Path(out) / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")


# -------------------------------------------------------------------------------------------------
# The run folder: one run at a time, atomic checkpoints, resumed exactly from the newest intact one


def lock_folder(folder):
    """An exclusive lock on `folder` (a lock file held open for the life of this process; the OS
    drops it when the process dies, however it dies). Raises UsageError naming the holder's pid."""
    import fcntl
    import gc
    f = open(Path(folder) / ".lock", "a+")
    for attempt in range(2):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if holder == str(os.getpid()) and attempt == 0:
                # this process's own earlier run, which failed and whose objects (the lock among
                # them) wait in a reference cycle of its traceback: free them and try again
                gc.collect()
                continue
            f.close()
            raise UsageError(f"{folder} is in use by another run (pid {holder}): wait for it to "
                             "finish, or choose another --out") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def open_run(out, resume, d):
    """The run folder OUT/: created and locked by rank 0 (a second run against it is refused), stale
    temporary files of a killed run removed; refused if it holds a run and `resume` is not asked
    for. Rank 0 logs to OUT/log.txt from here on."""
    out = Path(out)
    problem = None
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            d.lock = lock_folder(out)
            for stale in out.glob(".tmp*"):       # something being written when the last run died
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        except (UsageError, OSError) as e:
            problem = str(e) if isinstance(e, UsageError) else f"cannot use --out {out}: {e}"
    if d.all_sum(int(problem is not None)):       # every rank stops, rank 0 says why
        raise UsageError(problem or "rank 0 could not open the run folder")
    if resume is None and (out / "latest").is_file():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose "
                         "another --out")
    d.log_file = out / "log.txt"
    return out


def save_checkpoint(out, step, write, keep, d=None):
    """OUT/ckpt-{step:07d}/, written by write(folder) into a temporary folder and renamed, whole or
    not at all (svgt2i.atomic_write); then OUT/latest names it and all but the last `keep`
    checkpoints are removed (0: keep all). Rank 0 only; or, given `d`, every rank calls it and
    runs write() into one shared temporary folder (each writing its part: sharded state is saved
    in parallel), which rank 0 renames once every rank has finished. Returns the folder (None on
    other ranks)."""
    name = f"ckpt-{step:07d}"
    every_rank = d is not None and d.world > 1
    if every_rank:
        shared = out / f".tmp-{name}"          # a fixed name every rank knows; open_run clears it
        if d.main:
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
        d.barrier()
        write(shared)
        d.barrier()                            # every rank's part is on disk
        if not d.main:
            return d.barrier()

    def write_folder(tmp):
        if every_rank:
            os.replace(shared, tmp)
        else:
            tmp.mkdir()
            write(tmp)
    final = atomic_write(out / name, write_folder)
    atomic_write(out / "latest", lambda tmp: tmp.write_text(name + "\n"))
    if keep > 0:
        older = sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p != final)
        for old in older[:-keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
    if every_rank:
        d.barrier()
    return final


def checkpoint_problem(folder, files):
    """Why the checkpoint `folder` cannot be trusted (a file missing, truncated or not what it
    claims to be), or None. `files` are names; "a|b" accepts either (the first present is
    checked); a folder is a torch.distributed.checkpoint (sharded_problem). Cheap: safetensors
    headers, torch zip directories, JSON, file sizes."""
    from safetensors import safe_open
    for names in files:
        present = [n for n in names.split("|") if (Path(folder) / n).exists()]
        if not present:
            return f"{names.replace('|', ' or ')} is missing"
        name = present[0]
        f = Path(folder) / name
        try:
            if f.is_dir():
                problem = sharded_problem(f)
                if problem:
                    return f"{name}/{problem}"
            elif name.endswith(".safetensors"):
                with safe_open(str(f), "pt") as st:
                    st.keys()
            elif name.endswith(".json"):
                json.loads(f.read_text())
            else:
                torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            return f"{name} is corrupt or truncated ({type(e).__name__})"
    return None


def resume_folder(arg, out, files, warn=print):
    """--resume [DIR]: 'latest' -> OUT's newest checkpoint; a run folder -> its newest; a checkpoint
    folder as is. Each is checked (checkpoint_problem on `files`); from a run folder, a damaged
    newest checkpoint is passed over for the newest intact one, with a warning."""
    run = Path(out if arg == "latest" else arg)
    if not (run / "latest").is_file():
        if arg == "latest":
            raise UsageError(f"--resume: nothing to resume in {out} (no 'latest' file): drop "
                             "--resume to start a run")
        problem = checkpoint_problem(run, files)
        if problem:
            raise UsageError(f"--resume {run}: not an intact training checkpoint: {problem}")
        return run
    newest = run / (run / "latest").read_text().strip()
    candidates = [newest] + sorted((p for p in run.glob("ckpt-*") if p.is_dir() and p != newest),
                                   reverse=True)
    for folder in candidates:
        problem = checkpoint_problem(folder, files)
        if problem is None:
            return folder
        warn(f"warning: --resume: {folder} cannot be used ({problem}); trying an older checkpoint")
    raise UsageError(f"--resume: no intact checkpoint in {run}: drop --resume to start again")


def truncate_log(path, step):
    """Keep only the records of `path` (a .jsonl log) up to `step`: a resumed run logs the steps
    after its checkpoint again."""
    path = Path(path)
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


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
        sizes = [n for n in range(1, min(args.global_batch, 64) + 1) if args.global_batch % n == 0]
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by the world size "
                         f"{d.world}: run on {', '.join(map(str, sizes))} processes, or pass a "
                         f"--global-batch divisible by {d.world}")
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
    reason)]), and once per record without a prompt (a DiT item's "no_prompt": trained on the
    empty caption, as upstream); returns how many skips the items carry. `warned`: the run's
    (skipped, prompt-less) record indices warned of so far, two sets."""
    n, (skipped, no_prompt) = 0, warned
    for it in items:
        for i, reason in it["skipped"]:
            n += 1
            if i not in skipped:
                skipped.add(i)
                d.warn(f"warning: skipped {records.where(i)} ({reason})")
        if it.get("no_prompt") and it["index"] not in no_prompt:
            no_prompt.add(it["index"])
            count = len(no_prompt)
            d.warn(f"warning: {records.where(it['index'])} has no prompt: trained with the empty "
                   f"caption ({count} such record{'s' if count > 1 else ''} so far)")
    return n


def wrap_ddp(module, d):
    """DDP over the ranks (its gradients all-reduced, averaged, in the backward); one process: the
    module itself."""
    if d.world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
        gradient_as_bucket_view=True)


@contextlib.contextmanager
def command_line(name):
    """The entry points' error rule: bad input (UsageError, ValueError, FileNotFoundError) is one
    line `NAME: error: ...` on stderr (rank-prefixed under torchrun; a usage error, which every
    rank meets, said by rank 0 only) and exit code 2; the process group is closed either way."""
    try:
        yield
    except (UsageError, ValueError, FileNotFoundError) as e:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if rank == 0 or not isinstance(e, UsageError):   # every rank has a usage error: say it once
            prefix = f"[rank {rank}] " if world > 1 else ""
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


def check_replicas(model, d, shards=1):
    """Ranks that hold the same part of the weights hold it bit for bit (DDP guarantees it, and
    HSDP across its replicas; this proves it at every checkpoint): per-parameter sums of the raw
    bits (fp32 as int32, summed in int64), so any differing bit shows. `shards`: rank r holds
    shard r % shards (1: every rank the whole model; the world size: nothing to compare)."""
    if d.world == shards:
        return
    fp = torch.stack([local(p).detach().float().contiguous().view(torch.int32)
                      .sum(dtype=torch.int64) for p in model.parameters()])
    prints = d.gather(fp.cpu())
    bad = [r for r in range(d.world) if not torch.equal(prints[r], prints[r % shards])]
    if bad:
        raise RuntimeError(f"model replicas diverged: ranks {bad} differ from rank(s) "
                           f"{sorted({r % shards for r in bad})}")
    d.log(f"replicas identical on {d.world} ranks" + (f" ({d.world // shards} replicas of "
                                                      f"{shards} shards)" if shards > 1 else ""))


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (sent by schedulers before preemption, forwarded by torchrun) or SIGUSR1: finish the
    step, save, stop. Under torchrun, the death of its agent (this process's parent) stops the run
    the same way, so workers never train on unwatched. Yields stop(): the reason to stop, or
    None."""
    caught, old = [], {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, lambda signum, frame: caught.append(f"signal {signum}"))
               for s in (signal.SIGTERM, signal.SIGUSR1)}
    parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def stop():
        if parent is not None and os.getppid() != parent:
            caught.append("the death of torchrun's agent")
        return caught[0] if caught else None
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


# dense bf16 TFLOP/s of known GPUs: the denominator of the MFU estimates
PEAK_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "H20": 148, "A100": 312, "A800": 312,
               "L40S": 362, "B200": 2250, "GB200": 2500}


def peak_flops(device, tflops=None):
    """FLOP/s of `device` for the MFU: `tflops` (--peak-tflops) if given, else the table's entry
    for a known GPU, else None (no MFU)."""
    if tflops:
        return tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key] * 1e12
    return None


class Progress:
    """The progress of a long loop on a stream: on a terminal one line updated in place; in a log
    file a plain line every `every` of the way (and at the end), each with the rate and the time
    left, so a log stays readable."""

    def __init__(self, what, total, stream=None, every=0.05):
        self.what, self.total, self.every = what, max(total, 1), every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0, self.next = time.time(), 0.0

    def __call__(self, done, note=""):
        frac = done / self.total
        if not self.tty and frac < self.next and done < self.total:
            return
        self.next = frac + self.every
        dt = time.time() - self.t0
        eta = dt / done * (self.total - done) if done else 0.0
        line = (f"{self.what} {done}/{self.total} ({100 * frac:.0f}%){note} | {fmt_time(dt)} "
                f"elapsed, eta {fmt_time(eta)}")
        end = "\n" if not self.tty or done >= self.total else ""
        print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


# -------------------------------------------------------------------------------------------------
# Sharded training (FSDP2): the mesh, the wrapping, full files from shards, checkpoints that
# reshard (torch.distributed.checkpoint and fsdp are imported where used: seconds at every start)


def device_mesh(d, hsdp_shard=None):
    """The data-parallel mesh: 1-D (every tensor sharded over every rank), or with `hsdp_shard` N
    2-D, world / N replicas of N shards (rank r holds shard r % N of replica r // N): the
    all-gathers and reduce-scatters stay within a group (a node), only the gradient all-reduce
    of the shards crosses groups."""
    from torch.distributed.device_mesh import init_device_mesh
    if hsdp_shard:
        return init_device_mesh(d.device.type, (d.world // hsdp_shard, hsdp_shard),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("shard",))


def shard(model, blocks, mesh, bf16=False, forward_methods=()):
    """FSDP2: fully_shard each of `blocks`, then `model` (the root: what the blocks leave), so a
    block's parameters are all-gathered just before it runs and freed after it. Parameters become
    DTensors holding this rank's shard (the fp32 master weights; an optimizer built afterwards
    keeps its state sharded beside them). With `bf16` they are gathered in bf16 for compute and
    the gradients reduce-scattered in fp32. `forward_methods`: methods besides forward that run
    the model (the root's parameters must be gathered for them too)."""
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    # cast_forward_inputs=False: autocast decides the activations' dtypes, as with DDP (FSDP's
    # default casts every input to bf16: t before its sinusoid, and the joint residual stream)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) if bf16 else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    # FSDP2 warns that a module returning views (NextDiT's unpatchify) loses its backward hook to
    # an in-place op on them; the trainers' losses never modify a model's output in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def local(t):
    """This rank's part of t: the local shard of a DTensor, else t itself."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def like(full, target):
    """A full tensor laid out as `target`: this rank's part of it where target is a DTensor (cut
    locally, no communication), else the tensor itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(target, DTensor):
        return full
    return distribute_tensor(full.to(target.device), target.device_mesh, target.placements,
                             src_data_rank=None)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
                      torch.bool: "BOOL"}


def write_safetensors(path, tensors, main, metadata=None):
    """{name: tensor or DTensor} -> one safetensors file of full tensors, written by rank 0
    (`main`) one tensor at a time: the header comes from the global shapes, then each tensor is
    gathered (DTensor.full_tensor, a collective: every rank calls this), copied to the CPU,
    written and dropped. So no rank ever holds more than one full tensor beyond its shards."""
    from torch.distributed.tensor import DTensor
    header, offset = {}, 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header = {"__metadata__": metadata, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)             # the data starts 8-byte aligned, as safetensors'
    with open(path, "wb") if main else contextlib.nullcontext() as f:
        if main:
            f.write(len(blob).to_bytes(8, "little") + blob)
        for v in tensors.values():
            full = v.detach().full_tensor() if isinstance(v, DTensor) else v.detach()
            if main:
                f.write(full.cpu().contiguous().view(torch.uint8).numpy())
            del full


def read_into(tensors, path):
    """Copy the full tensors of a safetensors file into `tensors` ({name: tensor or DTensor}, the
    same names and global shapes; each rank copies its part), reading one tensor at a time.
    Raises ValueError naming the first misfit."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        missing, unknown = set(tensors) - set(f.keys()), set(f.keys()) - set(tensors)
        if missing or unknown:
            raise ValueError(f"missing keys {sorted(missing)[:3]}, unexpected keys "
                             f"{sorted(unknown)[:3]}")
        for k, dst in tensors.items():
            shape = tuple(f.get_slice(k).get_shape())
            if shape != tuple(dst.shape):
                raise ValueError(f"size mismatch for {k}: {shape} in the file, "
                                 f"{tuple(dst.shape)} in the model")
            with torch.no_grad():
                dst.copy_(like(f.get_tensor(k), dst))


def load_full_optimizer(opt, path):
    """opt.state_dict() saved as a file (full tensors, by parameter index) into `opt`, whose
    parameters may be sharded: each rank keeps its part. Memory-mapped: a rank reads its part."""
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, state in sd["state"].items():
        p = params[i]                               # clone: off the mapped file
        sd["state"][i] = {k: (like(v, p) if v.shape == p.shape else v).clone()
                          if torch.is_tensor(v) else v for k, v in state.items()}
    opt.load_state_dict(sd)


def save_sharded(folder, model, opt, **extra):
    """Model, optimizer and `extra` state dicts ({name: tensor or DTensor}) as one
    torch.distributed.checkpoint in `folder`: every rank writes its shards (in parallel), rank 0
    the metadata. Keyed by parameter names (the optimizer's too), whatever the wrapping, so a run
    in either mode, on any number of ranks, loads it (load_sharded). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    with plain_dcp():
        dcp.save({"model": msd, "optim": osd, **extra}, checkpoint_id=str(folder),
                 no_dist=not dist.is_initialized())


def load_sharded(folder, model, opt, **extra):
    """save_sharded's checkpoint into a model, optimizer and `extra` state dicts, in place,
    resharded to this run's layout (full tensors for a model that is not sharded). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(model, opt)    # the template (a fresh optimizer gets its state)
    sd = {"model": msd, "optim": osd, **extra}
    with plain_dcp():
        dcp.load(sd, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


@contextlib.contextmanager
def plain_dcp():
    """torch.distributed.checkpoint without its warning for one process (meant here) and with its
    failure (a CheckpointException, not an Exception) as a ValueError: the first rank's error."""
    from torch.distributed.checkpoint import CheckpointException
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable")
            yield
    except CheckpointException as e:
        error = next(iter(e.failures.values()))[0]
        raise ValueError(f"{type(error).__name__}: {error}") from None


def sharded_problem(folder):
    """Why a torch.distributed.checkpoint folder cannot be trusted, or None: its metadata
    unreadable, a shard file it names missing or shorter than the bytes it claims there."""
    from torch.distributed.checkpoint import FileSystemReader
    try:
        meta = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:
        return f".metadata is missing, corrupt or truncated ({type(e).__name__})"
    ends = {}
    for info in meta.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        f = Path(folder) / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size < end:
            return f"{name} is truncated"
    return None


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
