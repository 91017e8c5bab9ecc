"""
The plumbing: what real use of SVG-T2I needs and a learner may skip. You need not read this package
to learn the method; the files at the root hold it (svgt2i.py, the four models, data.py, the
entry points), and each calls in here one line per concern:

    files     the one checkpoint reader, JSON, image files, the atomic writer
    release   where the weights are: release, run and checkpoint file names, found or recorded
    loading   every model built from its files (meta device, strict keys, straight into dtype)
    cli       one-line errors, the flags both trainers share, device picking
    jobs      sample.py's jobs: prompt files, GenEval/DPG layouts, ranges, reruns, PNG metadata
    runs      a training run: ranks, the run folder, checkpoints, exact resume, signals, meters
    sharding  FSDP2: the mesh, the wrapping, full files from shards, checkpoints that reshard
    frozen    a DiT run's frozen encoders, latent statistics and feature cache, found or made
    tiny      tiny random frozen parts in the official layouts (--model tiny, the toy, tests)
"""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (plumbing.cli.command_line)."""
