"""
A training run, what both trainers share: this process's place in it (rank, world, device, the
collectives, logging), the run folder (one run at a time, stale files cleared), checkpoints written
atomically and resumed exactly (every generator), the end of a step (log, save, stop on a signal),
one meter, progress lines, and latent statistics summed over ranks.

    dist = Dist.start("auto")              # torchrun's environment -> rank, world, device
    out = open_run(args.out, args.resume, dist)
    ... write_checkpoint(...) ... checkpoint_to_resume("latest", out, FILES, dist.warn) ...

You need not read this to learn SVG-T2I.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from data import Positions, collate, load_bucket_crop
from plumbing import UsageError
from plumbing.cli import pick_device
from plumbing.files import atomic_write, describe, key_mismatch
from plumbing.sharding import local_shard, sharded_problem


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
        if world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, device)

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch_dist.barrier()

    def all_reduce(self, t, op=torch_dist.ReduceOp.SUM):
        """Reduce a tensor over ranks (on a device the backend takes); returns the
        result on the CPU."""
        if self.world == 1:
            return t
        t = t.to(self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t, op=op)
        return t.cpu()

    def all_sum(self, x):
        return type(x)(self.all_reduce(torch.tensor([float(x)], dtype=torch.float64)).item())

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
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


def open_run(out, resume, dist):
    """The run folder OUT/: created and locked by rank 0 (a second run against it is refused), stale
    temporary files of a killed run removed; refused if it holds a run and `resume` is not asked
    for. Rank 0 logs to OUT/log.txt from here on."""
    out = Path(out)
    problem = None
    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            links = [n for n in (".lock", "log.txt", "log.jsonl") if (out / n).is_symlink()]
            if links:         # a run writes (appends to) these itself, never where a link points
                raise UsageError(f"{out / links[0]} is a symbolic link: a run writes its own "
                                 "files in --out; remove the link, or choose another --out")
            dist.lock = lock_folder(out)
            for stale in out.glob(".tmp*"):       # something being written when the last run died
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        except (UsageError, OSError) as e:
            problem = str(e) if isinstance(e, UsageError) else f"cannot use --out {out}: {e}"
    if dist.all_sum(int(problem is not None)):       # every rank stops, rank 0 says why
        raise UsageError(problem or "rank 0 could not open the run folder")
    if resume is None and (out / "latest").is_file():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose "
                         "another --out")
    dist.log_file = out / "log.txt"
    return out


def publish_checkpoint(out, step, write, keep, dist=None):
    """OUT/ckpt-{step:07d}/, written by write(folder) into a temporary folder and renamed, whole or
    not at all (plumbing.files.atomic_write); then OUT/latest names it and all but the last `keep`
    checkpoints are removed (0: keep all). Rank 0 only; or, given `dist`, every rank calls it and
    runs write() into one shared temporary folder (each writing its part: sharded state is saved
    in parallel), which rank 0 renames once every rank has finished. Returns the folder (None on
    other ranks)."""
    name = f"ckpt-{step:07d}"
    every_rank = dist is not None and dist.world > 1
    if every_rank:
        shared = out / f".tmp-{name}"          # a fixed name every rank knows; open_run clears it
        if dist.main:
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
        dist.barrier()
        write(shared)
        dist.barrier()                            # every rank's part is on disk
        if not dist.main:
            return dist.barrier()

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
        dist.barrier()
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
        except UsageError:
            raise                                       # a planted file: refused, not passed over
        except Exception as e:
            return f"{name} is corrupt or truncated ({type(e).__name__})"
    return None


def checkpoint_to_resume(arg, out, files, warn=print):
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


def truncate_log(path, step, warn=print):
    """Keep only the records of `path` (a .jsonl log) up to `step`: a resumed run logs the steps
    after its checkpoint again. A line that is not a JSON record (torn by a kill midway through
    its write) is dropped, with a warning."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
            warn(f"warning: {path}:{number}: not a whole JSON record (torn by a kill?): dropped")
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def gather_state(dist, counters, skipped, **extra):
    """What a checkpoint's state.pt holds, gathered from every rank (all ranks call it): the
    counters, the world size, each rank's generators and skipped-image count. None off rank 0."""
    per_rank = dist.gather((rng_state(dist.device), skipped))
    if not dist.main:
        return None
    return {**counters, **extra, "world_size": dist.world, "rng": [r for r, _ in per_rank],
            "skipped": [n for _, n in per_rank]}


def restore_state(folder, dist, log_jsonl):
    """A checkpoint's state.pt, with this rank's generators restored when the world size is the
    same (nothing of the training itself depends on them); `log_jsonl` is cut back to the
    checkpoint's step (the steps after it will be logged again). Returns (state, this rank's
    skipped count: rank 0 carries the total when the world size changed)."""
    state = torch.load(Path(folder) / "state.pt", weights_only=True)
    skipped = sum(state["skipped"]) if dist.main else 0
    if state["world_size"] == dist.world:
        set_rng_state(state["rng"][dist.rank], dist.device)
        skipped = state["skipped"][dist.rank]
    if dist.main:
        truncate_log(log_jsonl, state["step"], dist.warn)
    dist.log(f"resumed from {folder} at step {state['step']}")
    return state, skipped


def write_checkpoint(dist, out, keep, counters, skipped, run_info, write_weights, stats=None,
                     **extra):
    """OUT/ckpt-{step:07d}/, both trainers' checkpoint: what write_weights(folder) writes (called
    on every rank: sharded state is gathered or written in parallel), then, by rank 0, state.pt
    (the counters, `extra`, every rank's generators and skipped count), latent_stats.pt (`stats`:
    a file to copy, or the official dict) and run.json (run_info and the step); whole or not at
    all (publish_checkpoint). Every rank calls it."""
    state = gather_state(dist, counters, skipped, **extra)
    step = counters["step"]

    def write(folder):
        write_weights(folder)
        if dist.main:
            torch.save(state, folder / "state.pt")
            if isinstance(stats, (str, Path)):
                shutil.copyfile(stats, folder / "latent_stats.pt")
            elif stats is not None:
                torch.save(stats, folder / "latent_stats.pt")
            (folder / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=1))
    try:
        folder = publish_checkpoint(out, step, write, keep, dist)
    except Exception as e:       # a full disk, a lost mount: one line (from each rank it failed on)
        raise ValueError(f"cannot write the checkpoint of step {step} in {out} ({describe(e)}): "
                         "the run stopped, its older checkpoints are intact: make room and go on "
                         "with --resume") from None
    dist.log(f"saved {folder}")


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


def check_replicas(model, dist, shards=1):
    """Ranks that hold the same part of the weights hold it bit for bit (DDP guarantees it, and
    HSDP across its replicas; this proves it at every checkpoint): per-parameter sums of the raw
    bits (fp32 as int32, summed in int64), so any differing bit shows. `shards`: rank r holds
    shard r % shards (1: every rank the whole model; the world size: nothing to compare)."""
    if dist.world == shards:
        return
    fp = torch.stack([local_shard(p).detach().float().contiguous().view(torch.int32)
                      .sum(dtype=torch.int64) for p in model.parameters()])
    prints = dist.gather(fp.cpu())
    bad = [r for r in range(dist.world) if not torch.equal(prints[r], prints[r % shards])]
    if bad:
        raise RuntimeError(f"model replicas diverged: ranks {bad} differ from rank(s) "
                           f"{sorted({r % shards for r in bad})}")
    layout = f" ({dist.world // shards} replicas of {shards} shards)" if shards > 1 else ""
    dist.log(f"replicas identical on {dist.world} ranks{layout}")


def load_fitting(model, sd, source, dist):
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
            dist.log(f"warning: {source}: {len(keys)} {what}: {', '.join(keys[:6])}{more}")
    model.load_state_dict(fits, strict=False)
    dist.log(f"initialised {len(fits)}/{len(own)} tensors from {source}")
    return set(fits)


def load_exactly(model, sd, problem):
    """--resume: every tensor of the model with its shape and nothing else, or the UsageError
    `problem` listing what does not fit."""
    problems = key_mismatch(model.state_dict(), sd)
    if problems:
        raise UsageError(f"{problem} ({problems})")
    model.load_state_dict(sd, strict=True)


def record_eval(run_json, result):
    """Add reconstruction metrics to a checkpoint's run.json under "eval", keyed by data,
    resolution and limit (ours only: official files have no run.json)."""
    run_json = Path(run_json)
    if not run_json.is_file():
        return
    run = json.loads(run_json.read_text())
    key = f"{result['data']}@{result['resolution']}" + (f":{result['limit']}" if result["limit"]
                                                        else "")
    run.setdefault("eval", {})[key] = {**result, "stage": run.get("stage"),
                                       "step": run.get("step")}
    text = json.dumps(run, indent=1)
    try:
        atomic_write(run_json, lambda tmp: tmp.write_text(text))
    except OSError as e:        # a read-only run: the metrics were printed; say why not recorded
        print(f"warning: the metrics are not recorded in {run_json} ({e.strerror or e})",
              file=sys.stderr)


# -------------------------------------------------------------------------------------------------
# The data stream and the loop around each step


def batch_plan(args, dist):
    """(images per rank and step, micro-batches per step): global batch = ranks x accumulation x
    micro-batch; args.micro_batch defaults to the whole local batch."""
    local = args.global_batch // dist.world
    if args.global_batch % dist.world:
        sizes = [n for n in range(1, min(args.global_batch, 64) + 1) if args.global_batch % n == 0]
        raise UsageError(f"--global-batch {args.global_batch} is not divisible by the world size "
                         f"{dist.world}: run on {', '.join(map(str, sizes))} processes, or pass a "
                         f"--global-batch divisible by {dist.world}")
    args.micro_batch = args.micro_batch or local
    if args.micro_batch < 1 or local % args.micro_batch:
        raise UsageError(f"--global-batch {args.global_batch} = {dist.world} ranks x {local}, and "
                         f"{local} is not a multiple of --micro-batch {args.micro_batch}")
    return local, local // args.micro_batch


def data_stream(args, dist, dataset, position, steps):
    """This rank's micro-batches (lists of dataset items) for the next `steps` steps, from global
    position `position` on: data.Positions over the dataset's records, seeded by (args.seed,
    args.resolution), args.micro_batch items at a time, args.workers loader processes."""
    sampler = Positions(len(dataset), args.seed, args.resolution, position, steps,
                        args.global_batch, dist.rank, dist.world)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, sampler=sampler,
                                            num_workers=args.workers, collate_fn=collate,
                                            prefetch_factor=4 if args.workers else None))


def warn_skipped(items, records, warned, dist):
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
                dist.warn(f"warning: skipped {records.where(i)} ({reason})")
        if it.get("no_prompt") and it["index"] not in no_prompt:
            no_prompt.add(it["index"])
            count = len(no_prompt)
            dist.warn(f"warning: {records.where(it['index'])} has no prompt: trained with the "
                      f"empty caption ({count} such record{'s' if count > 1 else ''} so far)")
    return n


def wrap_ddp(module, dist):
    """DDP over the ranks (its gradients all-reduced, averaged, in the backward); one process: the
    module itself."""
    if dist.world == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
        gradient_as_bucket_view=True)


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
    days, s = divmod(int(s), 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{days}d{h:02d}h" if days else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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


def end_of_step(dist, args, step, stop, report, save):
    """Both trainers' end of a step: report() every --log-every steps, save() every --save-every
    and at the last step; on a signal (stop(): stop_on_signals) on any rank, report and save now
    and return True: the run stops, to be continued with --resume."""
    reason = stop()
    stopping = dist.all_sum(int(reason is not None)) > 0
    if step % args.log_every == 0 or step == args.steps or stopping:
        report()
    if step % args.save_every == 0 or step == args.steps or stopping:
        save()
    if stopping:
        dist.log(f"stopped by {reason or 'another rank'} at step {step}: continue with --resume")
    return stopping


def check_finite(step, grad_norms):
    """Stop a run at a step whose gradient norm (of each {name: norm}) is not finite, before its
    update: a loss or weight gone NaN or infinite. Every rank stops alike (the norms are of the
    all-reduced gradients), and nothing of the step is saved: no NaN run ends "done", and the
    newest checkpoint stays the last good one."""
    for name, norm in grad_norms.items():
        if not math.isfinite(norm):
            raise UsageError(f"step {step}: the {name} is {norm}: the run diverged and stopped, "
                             "without saving; its newest checkpoint is the last good one: go on "
                             "from it (--resume) with a lower --lr or a --grad-clip")


def end_of_run(dist, step, args, t_start, out):
    """The last line of a run that reached its step count."""
    if step >= args.steps:
        dist.log(f"done: step {step}/{args.steps} ({fmt_time(time.time() - t_start)} in this "
                 f"process); checkpoints in {out}")


class Meter:
    """Both trainers' meter: sums over a log interval of named values (losses, logits), of the
    gradient norm, the step time and the FLOPs, reduced over ranks by report() (every rank calls
    it), which returns the interval's means and rates and starts a new interval."""

    def __init__(self, dist, names, steps, global_batch, peak=None):
        self.dist, self.names, self.peak = dist, list(names), peak
        self.column = {name: j for j, name in enumerate(self.names)}
        self.total_steps, self.global_batch = steps, global_batch
        self.t_start = time.time()
        self.reset()

    def reset(self):
        self.sums = torch.zeros(2, len(self.names), dtype=torch.float64)     # sums, counts
        self.steps, self.seconds, self.grad_norm, self.flops = 0, 0.0, 0.0, 0.0

    def add(self, **values):
        """Values [any shape] of named terms: each element counts once in its term's mean."""
        for name, v in values.items():
            v = v.detach().double().flatten().cpu()
            j = self.column[name]       # (an unknown name is a KeyError: a bug, not bad input)
            self.sums[0, j] += v.sum()
            self.sums[1, j] += v.numel()

    def step(self, grad_norm, seconds):
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        self.grad_norm += grad_norm

    def report(self, step, skipped):
        """{name: mean (None without values)}, grad_norm, images_per_s, mfu (None without a peak),
        skipped (summed over ranks), eta_s and elapsed_s."""
        extra = torch.tensor([self.flops, float(skipped)], dtype=torch.float64)
        vec = self.dist.all_reduce(torch.cat([self.sums.flatten(), extra]))
        sums = vec[:-2].view(2, -1)
        means = {n: (sums[0, j] / sums[1, j]).item() if sums[1, j] > 0 else None
                 for j, n in enumerate(self.names)}
        flops_per_s = vec[-2].item() / self.seconds
        rec = {**means, "grad_norm": self.grad_norm / self.steps,
               "images_per_s": self.steps * self.global_batch / self.seconds,
               "mfu": flops_per_s / (self.peak * self.dist.world) if self.peak else None,
               "skipped": int(vec[-1].item()),
               "eta_s": (self.total_steps - step) * self.seconds / self.steps,
               "elapsed_s": time.time() - self.t_start}
        self.reset()
        return rec


# -------------------------------------------------------------------------------------------------
# Latent statistics of the data, summed over ranks


class StatsAccumulator:
    """Per-channel mean and std of features [B, C, h, w] over all tokens seen
    (float64 running sums)."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def update(self, features):
        f = features.detach().double().transpose(0, 1).flatten(1)      # [C, B*h*w]
        if self.sum is None:
            self.sum = torch.zeros(f.shape[0], dtype=torch.float64)
            self.sumsq = torch.zeros(f.shape[0], dtype=torch.float64)
        self.n += f.shape[1]
        self.sum += f.sum(1).cpu()
        self.sumsq += (f * f).sum(1).cpu()

    def state(self):
        """The official file format: {'mean': [1, C], 'std': [1, C]} float32
        (one row: the final layer)."""
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean ** 2).clamp_min(0) * self.n / max(self.n - 1, 1)
        return {"mean": mean.float()[None], "std": var.sqrt().float()[None]}


def accumulate_stats(records, indices, crops, encode_images, cache=None, batch=16, warn=print):
    """Per-channel moments of the DINOv3 features of records[indices] as cropped for training
    (from the cache when there is one). encode_images: list of [3, h, w] -> list of
    [C, h/16, w/16]. Unreadable images are skipped with a warning. Returns a
    StatsAccumulator."""
    acc, images = StatsAccumulator(), []

    def flush():
        for f in encode_images(images) if images else ():
            acc.update(f[None])
        images.clear()

    for i in indices:
        try:
            if cache is not None:
                acc.update(cache.read(i)["latent"][None])
                continue
            images.append(load_bucket_crop(records[i]["path"], crops))
        except Exception as e:
            warn(f"warning: statistics skip {records.where(i)} ({describe(e)})")
            continue
        if len(images) == batch:
            flush()
    flush()
    return acc


def compute_stats(dist, records, indices, crops, encode_images, cache, batch, path):
    """Per-channel mean/std of the DINOv3 features of records[indices] (as cropped for training;
    each rank reads its share of `indices`), summed over ranks, saved in the official format
    ({'mean', 'std'}: [1, C]) to `path` by rank 0."""
    acc = accumulate_stats(records, indices[dist.rank::dist.world], crops, encode_images, cache,
                           batch, dist.warn)
    # ranks without data still join: the channel count is agreed on first
    C = int(dist.all_reduce(torch.tensor([0 if acc.sum is None else acc.sum.numel()]),
                            op=torch_dist.ReduceOp.MAX))
    vec = torch.zeros(1 + 2 * C, dtype=torch.float64)
    if acc.sum is not None:
        vec[0], vec[1:1 + C], vec[1 + C:] = float(acc.n), acc.sum, acc.sumsq
    vec = dist.all_reduce(vec)
    acc.n, acc.sum, acc.sumsq = int(vec[0]), vec[1:1 + C].clone(), vec[1 + C:].clone()
    if acc.n == 0:
        raise UsageError(f"cannot compute latent statistics: none of {len(indices)} images could "
                         "be read (pass --stats FILE)")
    if dist.main:
        atomic_write(path, lambda tmp: save_reproducibly(acc.state(), tmp))
    dist.barrier()


def save_reproducibly(obj, path):
    """torch.save through a file object: the archive's inner folder is then always "archive", not
    the (temporary) file's name, so the same statistics are the same bytes."""
    with open(path, "wb") as f:
        torch.save(obj, f)


# -------------------------------------------------------------------------------------------------
# train_autoencoder.py --eval: reconstruction metrics of the data, summed over ranks


def evaluate_autoencoder(args, metrics):
    """--eval: metrics(autoencoder, lpips, images [B, 3, S, S]) -> per image (PSNR, SSIM, LPIPS or
    None), of --ckpt over the first --limit images of --data (eval crops; rank r takes images r,
    r + world, ...; R, whose matching is per image, one at a time), averaged over ranks; unreadable
    images are skipped with a warning and counted. Printed, and recorded in the run.json of a
    checkpoint folder of ours (record_eval). Returns the result."""
    from data import eval_crop, open_records
    from plumbing.files import open_image, read_state_dict
    from plumbing.loading import load_autoencoder, load_lpips
    from plumbing.release import autoencoder_file
    dist = Dist.start(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = autoencoder_file(args.ckpt, "--ckpt")
    ae = load_autoencoder(path, dinov3_path=args.dinov3, device=dist.device)
    if ae.encoder is None:
        raise UsageError(f"--ckpt {path} holds no encoder.*: pass --dinov3")
    lpips = (load_lpips(args.vgg, args.lpips, read_state_dict(path), path, dist.device)
             if args.perceptual_weight > 0 else None)
    records, t0 = open_records(args.data), time.time()
    n = min(len(records), args.limit or len(records))
    batch = 1 if ae.residual is not None else args.eval_batch
    sums = torch.zeros(5, dtype=torch.float64)       # images, psnr, ssim, lpips, unreadable
    mine = list(range(dist.rank, n, dist.world))
    for start in range(0, len(mine), batch):
        images = []
        for i in mine[start:start + batch]:
            try:
                images.append(eval_crop(open_image(records[i]["path"]), args.eval_resolution))
            except Exception as e:
                dist.warn(f"warning: eval skips {records.where(i)} ({describe(e)})")
                sums[4] += 1
        if images:
            p, s, lp = metrics(ae, lpips, torch.stack(images).to(dist.device))
            sums[:4] += torch.tensor([len(images), p.sum(), s.sum(),
                                      lp.sum() if lp is not None else 0.0], dtype=torch.float64)
        dist.log(f"eval: {min(start + batch, len(mine))}/{len(mine)} images of rank {dist.rank}",
                 end="\r")
    sums = dist.all_reduce(sums)
    if sums[0] == 0:
        raise UsageError(f"--eval: none of {n} images in {args.data} could be read")
    result = {"psnr": sums[1].item() / sums[0].item(), "ssim": sums[2].item() / sums[0].item(),
              "lpips": sums[3].item() / sums[0].item() if lpips is not None else None,
              "images": int(sums[0]), "skipped": int(sums[4]), "resolution": args.eval_resolution,
              "data": os.path.abspath(args.data), "limit": args.limit}
    lp = "n/a (--perceptual-weight 0)" if lpips is None else f"{result['lpips']:.4f}"
    dist.log(f"\n{path}: PSNR {result['psnr']:.2f} dB | SSIM {result['ssim']:.4f} | LPIPS {lp} | "
             f"{result['images']} images ({result['skipped']} unreadable) | "
             f"{fmt_time(time.time() - t0)}")
    if dist.main:
        record_eval(path.parent / "run.json", result)
    return result
