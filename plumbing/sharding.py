"""
FSDP2, for models a full replica per GPU does not fit: the device mesh (1-D, or 2-D for HSDP), the
per-block wrapping, full safetensors files streamed from the shards one tensor at a time, and
torch.distributed.checkpoint folders that reshard on load (any mode, any world size).
torch.distributed.checkpoint and fsdp are imported where used: they cost seconds at every start.

You need not read this to learn SVG-T2I.
"""

import contextlib
import json
import warnings
from pathlib import Path

import torch
import torch.distributed as torch_dist

from plumbing import UsageError
from plumbing.files import first_line, refused_global
from plumbing.release import LORA_FILE, LORA_TRAIN_FILE


def parallel_plan(args, dist):
    """train.py's --parallel, --hsdp-shard and --shard-text-encoder checked against the world
    size; the device mesh (dist.mesh) when anything is sharded."""
    sharded = args.parallel == "fsdp" or args.shard_text_encoder
    if sharded and dist.world == 1:
        flag = "--parallel fsdp" if args.parallel == "fsdp" else "--shard-text-encoder"
        raise UsageError(f"{flag} shards over processes: run it under torchrun with 2 or more "
                         "(one process trains the same with --parallel ddp and resumes any "
                         "checkpoint)")
    if args.hsdp_shard is not None:
        sizes = [n for n in range(1, dist.world + 1) if dist.world % n == 0]
        if args.parallel != "fsdp":
            raise UsageError("--hsdp-shard needs --parallel fsdp")
        if args.hsdp_shard not in sizes:
            raise UsageError(f"--hsdp-shard {args.hsdp_shard} does not divide the world size "
                             f"{dist.world}: pass one of {', '.join(map(str, sizes))}")
    if args.shard_text_encoder and args.cache:
        raise UsageError("--shard-text-encoder cannot fill a --cache (each rank encodes records "
                         "of its own): fill the cache in a run without it")
    if sharded:
        dist.mesh = device_mesh(dist, args.hsdp_shard)


def device_mesh(dist, hsdp_shard=None):
    """The data-parallel mesh: 1-D (every tensor sharded over every rank), or with `hsdp_shard` N
    2-D, world / N replicas of N shards (rank r holds shard r % N of replica r // N): the
    all-gathers and reduce-scatters stay within a group (a node), only the gradient all-reduce
    of the shards crosses groups."""
    from torch.distributed.device_mesh import init_device_mesh
    if hsdp_shard:
        return init_device_mesh(dist.device.type, (dist.world // hsdp_shard, hsdp_shard),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(dist.device.type, (dist.world,), mesh_dim_names=("shard",))


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
    fp32 = MixedPrecisionPolicy(cast_forward_inputs=False)
    for part in [*blocks, None]:
        # autocast computes matmuls and convolutions in bf16 and leaves every other weight fp32
        # (RMSNorm's): those are gathered in fp32, as one group per block, so FSDP computes
        # what DDP does (a bf16 gather of every weight moved 6 steps of the tiny run by 3e-4)
        kept = autocast_fp32_modules(part or model, skip=() if part else blocks)
        if bf16 and kept:
            fully_shard(kept, mesh=mesh, mp_policy=fp32)
        if part is not None:
            fully_shard(part, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    # FSDP2 warns that a module returning views (NextDiT's unpatchify) loses its backward hook to
    # an in-place op on them; the trainers' losses never modify a model's output in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return model


def autocast_fp32_modules(root, skip=()):
    """The modules under `root` (not under those in `skip`) that hold parameters autocast keeps
    fp32: every one with weights of its own except linear layers and convolutions."""
    inside = {id(m) for b in skip for m in b.modules()}
    matmul = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    return [m for m in root.modules() if id(m) not in inside and not isinstance(m, matmul)
            and any(True for _ in m.parameters(recurse=False))]


def local_shard(t):
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
                 no_dist=not torch_dist.is_initialized())


def load_sharded(folder, model, opt, **extra):
    """save_sharded's checkpoint into a model, optimizer and `extra` state dicts, in place,
    resharded to this run's layout (full tensors for a model that is not sharded). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    read_dcp_metadata(folder)       # a refused .metadata is its own one-line error, before dcp
    msd, osd = get_state_dict(model, opt)    # the template (a fresh optimizer gets its state)
    sd = {"model": msd, "optim": osd, **extra}
    with plain_dcp():
        dcp.load(sd, storage_reader=safe_reader(folder), planner=safe_planner(folder),
                 no_dist=not torch_dist.is_initialized())
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
        if isinstance(error, UsageError):         # a refused file: its own message
            raise error from None
        raise ValueError(f"{type(error).__name__}: {error}") from None


# -------------------------------------------------------------------------------------------------
# Reading a DCP folder without running it. torch's FileSystemReader unpickles .metadata and its
# default planner torch.loads the non-tensor values of the shards (AdamW's lr, betas, ...) with
# weights_only=False: a planted file would run code on --resume. Ours admit only what
# save_sharded writes.

def metadata_globals():
    """{(module, name): object}: every global a .metadata written by save_sharded names (found by
    recording the unpickler on real checkpoints): DCP's metadata dataclasses and enums, its
    storage record, torch.Size, dtypes, layouts by name, and the checkpoint's path."""
    import dataclasses
    import enum
    import pathlib

    import torch.distributed.checkpoint.metadata as meta
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    allowed = {(v.__module__, v.__name__): v for v in vars(meta).values()
               if isinstance(v, type) and v.__module__ == meta.__name__
               and (dataclasses.is_dataclass(v) or issubclass(v, enum.Enum))}
    allowed.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    for cls in (_StorageInfo, pathlib.PosixPath, pathlib.PurePosixPath):
        allowed[cls.__module__, cls.__name__] = allowed["pathlib", cls.__name__] = cls
    allowed["torch", "Size"] = torch.Size
    allowed["torch.serialization", "_get_layout"] = torch.serialization._get_layout  # a lookup
    return allowed


def read_dcp_metadata(folder, load_id=None):
    """A DCP folder's .metadata, unpickled with only metadata_globals: anything else (a planted
    os.system, ...) is a UsageError naming the file, raised before that global is even looked up;
    unreadable data is the pickle error."""
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
    path = Path(folder) / ".metadata"
    allowed = metadata_globals()

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise UsageError(f"{path} names {module}.{name}, which a checkpoint's metadata "
                                 "never holds: refused unread (the file may have been planted); "
                                 "delete this checkpoint, or resume from another")
            return allowed[module, name]

    meta = Restricted(io.BytesIO(path.read_bytes())).load()
    if not isinstance(meta, Metadata):
        raise ValueError(f"{path} holds a {type(meta).__name__}, not DCP metadata")
    if getattr(meta, "storage_meta", None) is None:       # as torch's reader: older files lack it
        meta.storage_meta = StorageMeta()
    meta.storage_meta.load_id = load_id
    return meta


def safe_reader(folder):
    """torch's FileSystemReader of `folder`, but reading .metadata with read_dcp_metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):   # (no rank-local metadata: save_sharded's)
            return read_dcp_metadata(self.path, self.load_id)

    return SafeReader(str(folder))


def safe_planner(folder):
    """torch's DefaultLoadPlanner, but a non-tensor value of the shards must load with
    weights_only=True (plain numbers, strings, tuples: what AdamW's param groups are) before
    torch's own placement reads the same bytes: no other global is ever looked up."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                torch.load(value, weights_only=True)
            except Exception as e:
                what = refused_global(e) or first_line(e)
                raise UsageError(f"{folder}: the value {read_item.dest_index.fqn} in its shards "
                                 f"holds Python objects (torch refused {what}): refused unread "
                                 "(the file may have been planted); delete this checkpoint, or "
                                 "resume from another") from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner()


def sharded_problem(folder):
    """Why a torch.distributed.checkpoint folder cannot be trusted, or None: its metadata
    unreadable, a shard file it names missing or shorter than the bytes it claims there."""
    try:
        meta = read_dcp_metadata(folder)
    except UsageError:
        raise                         # a planted file is refused outright, never passed over
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


def write_model_ema_optimizer(folder, model, ema, opt, dist, sharded, step):
    """A DiT checkpoint's weights, in either mode: {model,ema}.safetensors (full tensors, what
    sample.py and --init-from read), then optimizer.pt (unsharded) or dcp/ (sharded: the model,
    AdamW and EMA shards, every rank writing its own). Every rank calls it (the full files are
    gathered tensor by tensor)."""
    meta = {"format": "pt", "step": str(step)}
    if getattr(model, "lora", None):      # train.py --lora: the adapters only (the base is a file)
        return write_lora(Path(folder), model, ema, opt, dist, meta)
    write_safetensors(Path(folder) / "model.safetensors", model.state_dict(), dist.main, meta)
    write_safetensors(Path(folder) / "ema.safetensors", ema, dist.main, meta)
    if sharded:
        save_sharded(Path(folder) / "dcp", model, opt, ema=ema)
    elif dist.main:
        torch.save(opt.state_dict(), Path(folder) / "optimizer.pt")


def read_model_ema_optimizer(folder, model, ema, opt, model_flags):
    """write_model_ema_optimizer's checkpoint, of either mode, into this run's model, EMA and
    optimizer (sharded or not: each rank keeps its part; dcp/ is resharded). A checkpoint of
    another model is a UsageError naming `model_flags` (e.g. "--model tiny")."""
    folder = Path(folder)
    if getattr(model, "lora", None) or not (folder / "model.safetensors").is_file():
        return read_lora_checkpoint(folder, model, ema, opt)
    try:
        if (folder / "dcp").is_dir():
            load_sharded(folder / "dcp", model, opt, ema=ema)
        else:
            read_into(model.state_dict(), folder / "model.safetensors")
            read_into(ema, folder / "ema.safetensors")
            load_full_optimizer(opt, folder / "optimizer.pt")
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--resume {folder}: the checkpoint does not fit {model_flags} "
                         f"({str(e).strip().splitlines()[0]}): pass the run's "
                         "--model/--model-config") from None


def write_lora(folder, model, ema, opt, dist, meta):
    """A train.py --lora checkpoint's weights: lora.safetensors (the adapters' EMA: the file to
    sample with), lora_train.safetensors (the adapters as trained) and optimizer.pt, the LoRA's
    rank, alpha, targets and base in both files' metadata."""
    from nextdit import lora_state_dict
    from plumbing.loading import lora_metadata
    meta = {**meta, **lora_metadata(model.lora)}
    write_safetensors(folder / LORA_FILE, ema, dist.main, meta)
    write_safetensors(folder / LORA_TRAIN_FILE, lora_state_dict(model), dist.main, meta)
    if dist.main:
        torch.save(opt.state_dict(), folder / "optimizer.pt")


def read_lora_checkpoint(folder, model, ema, opt):
    """write_lora's checkpoint into this run's adapters, their EMA and AdamW; it must be a LoRA
    checkpoint of the same rank, alpha and targets (one line otherwise)."""
    from safetensors import safe_open

    from nextdit import lora_state_dict
    from plumbing.loading import lora_metadata
    if not getattr(model, "lora", None):
        raise UsageError(f"--resume {folder}: a LoRA checkpoint: add its --lora")
    if not (folder / LORA_TRAIN_FILE).is_file():
        raise UsageError(f"--resume {folder}: not a LoRA checkpoint: drop --lora")
    with safe_open(str(folder / LORA_TRAIN_FILE), "pt") as f:
        saved = f.metadata() or {}
    for key, value in lora_metadata(model.lora).items():
        if key != "lora_base" and saved.get(key) != value:
            raise UsageError(f"--resume {folder}: its {key} is {saved.get(key)}, this run's "
                             f"{value}: resume with the run's own --lora flags")
    read_into(lora_state_dict(model), folder / LORA_TRAIN_FILE)
    read_into(ema, folder / LORA_FILE)
    load_full_optimizer(opt, folder / "optimizer.pt")
