"""Both trainers against bad numbers, hostile run folders and runs that go wrong: each bad flag is one line and
exit 2 before anything is written; a symlink in a run folder is never followed; --grad-clip 0 means no clipping
in both; a run whose gradient or weights stop being finite stops without saving them; a log line torn by a kill
is dropped on resume; a full disk during a checkpoint is one line and keeps the older checkpoints."""

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_train
import test_train_autoencoder
import train
import train_autoencoder
from plumbing import runs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: tiny runs, one intra-op thread
TRAINERS = ["train", "train_autoencoder"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The tiny data and frozen parts of both trainers' tests, made once (each on first use)."""
    made = {}

    def world(trainer):
        if trainer not in made:
            module = test_train if trainer == "train" else test_train_autoencoder
            made[trainer] = module.make_world(tmp_path_factory.mktemp(trainer))
        return made[trainer]
    return world


def args_of(trainer, world, out, steps=2, *extra):
    """A tiny run of `trainer`: train.py's tiny DiT (global batch 4), or autoencoder-P at 32 px (batch 4)."""
    if trainer == "train":
        return test_train.common(world, out, steps, 4, 2, "--stats", world["stats"], *extra)
    return test_train_autoencoder.args_for(world, out, *extra, steps=steps)


def run(trainer, args, capsys):
    """The trainer's main(args) in this process: (exit code, stderr lines)."""
    module = train if trainer == "train" else train_autoencoder
    try:
        module.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def one_error(trainer, args, capsys):
    """main(args) must exit 2 with one error line (after any warnings); returns that line."""
    code, lines = run(trainer, args, capsys)
    assert code == 2 and lines and lines[-1].startswith(f"{trainer}.py: error:"), lines
    assert all(line.startswith(("warning:", "[rank")) for line in lines[:-1]), lines
    return lines[-1]


def weights(trainer, folder):
    name = "model.safetensors" if trainer == "train" else "autoencoder.safetensors"
    return load_file(str(Path(folder) / name))


# ---------------------------------------------------------------------------------------------------------------
# Bad numbers: one line, exit 2, before anything is written

BOTH = [
    (["--threads", "-1"], "--threads -1: must be at least 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--grad-clip", "nan"], "--grad-clip nan: must be a finite number"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: the largest gradient norm must be positive"),
    (["--lr", "1e39"], "--lr 1e+39: Adam's step size must lie in [0, 1]"),
    (["--global-batch", "1000000000"], "--global-batch 1000000000: at most 65536"),
    (["--micro-batch", "8192", "--global-batch", "8192"], "--micro-batch 8192: at most 4096"),
    (["--workers", "-2"], "--workers -2: must be at least 0"),
]
DIT = [
    (["--resolution", "1600000"], "--resolution 1600000: at most 4096"),
    (["--model-config", '{"dim": "wide"}'], 'dim "wide": must be a whole number >= 1'),
    (["--model-config", '{"n_layers": 0}'], "n_layers 0: must be a whole number >= 1"),
    (["--model-config", '{"axes_dims": []}'], "axes_dims []: must be a non-empty list"),
    (["--model-config", '{"n_heads": 5}'], "no model of that shape (NextDiTConfig: dim"),
    (["--model-config", '{"in_channels": 8}'], "['in_channels'] follow the frozen encoders"),
]
AUTOENCODER = [
    (["--decoder-config", '{"ch": "wide"}'], 'ch "wide": must be a whole number >= 1'),
    (["--decoder-config", '{"ch": 0}'], "ch 0: must be a whole number >= 1"),
    (["--decoder-config", '{"ch_mult": []}'], "ch_mult []: must be a non-empty list"),
    (["--decoder-config", '{"ch": 8}'], "no model of that shape"),            # GroupNorm(32) of 8 channels
    (["--decoder-config", '{"num_res_blocks": -1}'], "num_res_blocks -1: must be a whole number >= 0"),
    (["--residual-config", '{"eps": 0}'], "eps 0: must be a positive number"),
    (["--resolution", "16"], "the discriminator needs crops of at least 32 px a side"),
    (["--resolution", "32", "--crops", "buckets"], "use --resolution >= 64"),
    (["--resolution", "160000", "--crops", "buckets"], "--resolution 160000: at most 4096"),
]
CASES = ([("train", *c) for c in BOTH + DIT] + [("train_autoencoder", *c) for c in BOTH + AUTOENCODER])


@pytest.mark.parametrize("trainer, extra, message", CASES,
                         ids=[f"{t}:{' '.join(e)}" for t, e, _ in CASES])
def test_bad_numbers_are_one_line_before_any_work(worlds, tmp_path, capsys, trainer, extra, message):
    out = tmp_path / "out"
    line = one_error(trainer, args_of(trainer, worlds(trainer), out, 2, *extra), capsys)
    assert message in line, line
    assert not out.exists()


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("name", [".lock", "log.txt", "log.jsonl"])
def test_a_symlink_in_the_run_folder_is_not_followed(worlds, tmp_path, capsys, trainer, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's notes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    line = one_error(trainer, args_of(trainer, worlds(trainer), out, 1), capsys)
    assert f"{out / name} is a symbolic link" in line
    assert victim.read_text() == "the user's notes\n"


# ---------------------------------------------------------------------------------------------------------------
# --grad-clip, and runs that diverge

@pytest.mark.parametrize("trainer", TRAINERS)
def test_grad_clip_0_is_no_clipping_in_both_trainers(worlds, tmp_path, capsys, trainer):
    """0 trains exactly as a bound no gradient reaches (clip_grad_norm_ then scales by exactly 1), and moves the
    weights (train.py's 0 once clipped every gradient to nothing); a tight bound trains differently."""
    w = worlds(trainer)
    final = {}
    for clip in ("0", "1e12", "1e-6"):
        out = tmp_path / clip
        assert run(trainer, args_of(trainer, w, out, 2, "--grad-clip", clip), capsys)[0] == 0
        final[clip] = weights(trainer, out / "ckpt-0000002")
    init = initial_weights(trainer, w, tmp_path, capsys)
    assert all(torch.equal(final["0"][k], final["1e12"][k]) for k in final["0"])
    moved = [k for k in final["0"] if not torch.equal(final["0"][k], init[k])]
    assert len(moved) >= 8, moved       # (adaLN-zero: the DiT's first steps move only some tensors)
    assert any(not torch.equal(final["0"][k], final["1e-6"][k]) for k in moved)


def initial_weights(trainer, w, tmp_path, capsys):
    """The weights a run starts from (a 0-step run saves nothing: 1 step at lr ~0 writes them)."""
    out = tmp_path / "init"
    assert run(trainer, args_of(trainer, w, out, 1, "--lr", "1e-30"), capsys)[0] == 0
    return weights(trainer, out / "ckpt-0000001")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_weights_that_are_not_finite_stop_the_run_before_it_saves(worlds, tmp_path, capsys, trainer):
    """Starting from a checkpoint with one NaN weight: the first gradient is NaN; nothing is saved."""
    w = worlds(trainer)
    assert run(trainer, args_of(trainer, w, tmp_path / "first", 1), capsys)[0] == 0
    poisoned = tmp_path / "poisoned"
    shutil.copytree(tmp_path / "first" / "ckpt-0000001", poisoned)
    for f in poisoned.glob("*.safetensors"):
        sd = load_file(str(f))
        k = next(k for k in sd if k.startswith(("x_embedder", "decoder.conv_in")))
        sd[k].view(-1)[0] = math.nan
        save_file(sd, str(f))
    out = tmp_path / "out"
    extra = ["--init-from", str(poisoned)] + (["--dinov3", w["dinov3"]] if trainer != "train" else [])
    line = one_error(trainer, args_of(trainer, w, out, 2, *extra), capsys)
    assert "step 1: the gradient norm is nan: the run diverged and stopped, without saving" in line, line
    assert not (out / "latest").exists() and not list(out.glob("ckpt-*"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_loss_that_is_not_finite_stops_the_run_at_the_last_good_checkpoint(worlds, tmp_path, capsys,
                                                                               monkeypatch, trainer):
    """Step 2's loss made NaN (the trainer's loss function patched): the run stops there, unsaved; `latest` stays
    step 1's checkpoint, and its weights are all finite."""
    module = train if trainer == "train" else train_autoencoder
    name = "flow_matching_loss" if trainer == "train" else "generator_loss"
    loss, calls = getattr(module, name), []
    per_step = 2 if trainer == "train" else 1                   # micro-batches per step

    def poisoned(*args, **kwargs):
        calls.append(1)
        result = loss(*args, **kwargs)
        if len(calls) > per_step:
            return (result * math.nan if torch.is_tensor(result) else (result[0] * math.nan, *result[1:]))
        return result
    monkeypatch.setattr(module, name, poisoned)
    out = tmp_path / "out"
    line = one_error(trainer, args_of(trainer, worlds(trainer), out, 3, "--save-every", "1"), capsys)
    assert "step 2: the gradient norm is nan" in line and "go on from it (--resume)" in line, line
    assert (out / "latest").read_text().strip() == "ckpt-0000001" and not (out / "ckpt-0000002").exists()
    assert all(torch.isfinite(t).all() for t in weights(trainer, out / "ckpt-0000001").values())


# ---------------------------------------------------------------------------------------------------------------
# Resume after a torn log line; a full disk during a checkpoint

@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_torn_last_log_line_is_dropped_on_resume(worlds, tmp_path, capsys, trainer):
    w, out = worlds(trainer), tmp_path / "out"
    assert run(trainer, args_of(trainer, w, out, 2), capsys)[0] == 0
    log = out / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "loss": 0.2')           # killed midway through a write
    code, lines = run(trainer, args_of(trainer, w, out, 3, "--resume"), capsys)
    assert code == 0, lines
    assert any(f"{log}:3: not a whole JSON record" in line for line in lines), lines
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_older_ones(worlds, tmp_path, trainer):
    """Step 1's checkpoint is written freely; the run resumed from it runs in a subprocess whose files may not
    grow past half the largest file of that checkpoint (RLIMIT_FSIZE: a write beyond it fails, as on a full
    disk), so writing step 2's checkpoint fails: one line, and step 1's stays whole and `latest`."""
    w, out = worlds(trainer), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / f"{trainer}.py")]
    done = subprocess.run(script + args_of(trainer, w, out, 1), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    limit = max(f.stat().st_size for f in (out / "ckpt-0000001").iterdir()) // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails (EFBIG), as ENOSPC does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    failed = subprocess.run(script + args_of(trainer, w, out, 2, "--resume"), env=env, capture_output=True,
                            text=True, preexec_fn=small_files)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr
    assert lines[0].startswith(f"{trainer}.py: error: cannot write the checkpoint of step 2 in {out}"), lines
    assert "its older checkpoints are intact" in lines[0]
    assert (out / "latest").read_text().strip() == "ckpt-0000001"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("ckpt", ".tmp"))) == ["ckpt-0000001"]
    assert runs.checkpoint_problem(out / "ckpt-0000001", ["state.pt", "run.json"]) is None


def test_eval_of_a_read_only_run_prints_its_metrics_and_says_why_they_are_not_recorded(worlds, tmp_path, capsys,
                                                                                      monkeypatch):
    w, out = worlds("train_autoencoder"), tmp_path / "out"
    assert run("train_autoencoder", args_of("train_autoencoder", w, out, 1), capsys)[0] == 0

    def read_only(path, write):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(runs, "atomic_write", read_only)
    code, lines = run("train_autoencoder", ["--eval", "--data", w["data"], "--ckpt", str(out), "--eval-resolution",
                                            "32", "--limit", "2"], capsys)
    assert code == 0, lines
    assert lines[-1] == (f"warning: the metrics are not recorded in {out / 'ckpt-0000001' / 'run.json'} "
                         "(Permission denied)"), lines
    assert math.isfinite(json.loads((out / "ckpt-0000001" / "run.json").read_text())["step"])
