"""train.py (or train_autoencoder.py) with test instruments, which the user command lines do not have. Run as a
script (torchrun can launch it) or use `instruments` in-process:

    python tests/train_harness.py [--trainer train_autoencoder] [--kill-after-step N] [--dump-grads] -- ARGUMENTS

--kill-after-step N  SIGKILL this process when step N + 1 begins its update (step N is logged and, if it is a
                     save step, checkpointed), to prove that a killed run resumes exactly
--dump-grads         save every step's gradients of the global mean loss (all-reduced, before clipping) as
                     OUT/grads-{step:07d}-rank{r}.safetensors, keys p000, p001, ... in parameter order (full
                     tensors: with --parallel fsdp every rank gathers each sharded gradient)

Both hook torch.nn.utils.clip_grad_norm_, which both trainers call once per step, after backward (train_autoencoder.py
on the autoencoder's parameters, before their update); steps are numbered as the run numbers them (a resumed run
counts on from its checkpoint).
"""

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def full(t):
    """A full tensor from a DTensor (all ranks gather it), else t."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def instruments(out, kill_after_step=None, dump_grads=False, trainer="train"):
    import importlib
    module = importlib.import_module(trainer)
    clip, restore = torch.nn.utils.clip_grad_norm_, getattr(module, "restore_state", None)
    step = [0]

    def restored(*args, **kwargs):       # steps count on from the checkpoint's
        state, skipped = restore(*args, **kwargs)
        step[0] = state["step"]
        return state, skipped

    def hooked(params, *args, **kwargs):
        params = list(params)
        step[0] += 1
        if kill_after_step is not None and step[0] == kill_after_step + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if dump_grads:
            rank = os.environ.get("RANK", "0")
            grads = {f"p{i:03d}": full(p.grad).detach().cpu().contiguous()
                     for i, p in enumerate(params) if p.grad is not None}
            save_file(grads, str(Path(out) / f"grads-{step[0]:07d}-rank{rank}.safetensors"))
        return clip(params, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = hooked
    if restore is not None:
        module.restore_state = restored
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
        if restore is not None:
            module.restore_state = restore


def main():
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--kill-after-step", type=int, default=None)
    p.add_argument("--dump-grads", action="store_true")
    p.add_argument("--trainer", choices=["train", "train_autoencoder"], default="train")
    mine, theirs = p.parse_args(argv[:split]), argv[split + 1:]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import importlib
    trainer = importlib.import_module(mine.trainer)
    out = theirs[theirs.index("--out") + 1]
    with instruments(out, mine.kill_after_step, mine.dump_grads, mine.trainer):
        trainer.main(theirs)


if __name__ == "__main__":
    main()
