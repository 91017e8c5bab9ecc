"""train.py against faults and mistakes: a damaged checkpoint is passed over for the newest intact one,
a second run on a live run folder is refused, workers stop when torchrun's agent dies, a moved run
still resumes, bad devices and world sizes get one line, records without a prompt are reported, and
the official release beside the command is found."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing import runs
import train
from test_train import common, log_records, run_cli, world  # noqa: F401 (world: a fixture)
from train_helpers import write_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: tiny runs, one intra-op thread


def args_for(world, out, steps, *extra):
    """train.py arguments of a tiny run: global batch 4 in micro-batches of 2."""
    return common(world, out, steps, 4, 2, *extra)


def main_error(args, capsys):
    """train.main(args) must exit 2 with one error line (after any warnings); returns that line."""
    with pytest.raises(SystemExit) as e:
        train.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and lines[-1].startswith("train.py: error:"), lines
    assert all(line.startswith("warning:") for line in lines[:-1]), lines
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# Damaged checkpoints

@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("faults") / "ref"
    train.main(args_for(world, out, 6, "--save-every", "2", "--keep", "0", "--stats", world["stats"]))
    return out


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" * 64)


@pytest.mark.parametrize("name, how", [("model.safetensors", "truncate"), ("ema.safetensors", "garbage"),
                                       ("optimizer.pt", "truncate"), ("state.pt", "garbage"),
                                       ("run.json", "garbage"), ("latent_stats.pt", "missing")])
def test_resume_passes_over_a_damaged_checkpoint(world, reference, tmp_path, capsys, name, how):
    out = tmp_path / "run"
    args = args_for(world, out, 4, "--save-every", "2", "--keep", "0", "--stats", world["stats"])
    train.main(args)
    victim = out / "ckpt-0000004" / name
    victim.unlink() if how == "missing" else damage(victim, how)
    capsys.readouterr()
    train.main(args_for(world, out, 6, "--save-every", "2", "--keep", "0", "--stats", world["stats"],
                      "--resume"))
    captured = capsys.readouterr()
    assert f"ckpt-0000004 cannot be used ({name} is" in captured.err
    assert "resumed from" in captured.out and "ckpt-0000002 at step 2" in captured.out
    # continued exactly from step 2: the same weights as the run that was never damaged
    for f in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(reference / "ckpt-0000006" / f)), load_file(str(out / "ckpt-0000006" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    # and the log holds every step once
    assert [r["step"] for r in log_records(out)] == [1, 2, 3, 4, 5, 6]


def test_damaged_checkpoint_named_explicitly_or_no_intact_one(world, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damage(run / "ckpt-0000006" / "state.pt", "truncate")
    err = main_error(common(world, tmp_path / "new", 8) + ["--resume", str(run / "ckpt-0000006")], capsys)
    assert "ckpt-0000006: not an intact training checkpoint: state.pt is corrupt or truncated" in err
    for c in run.glob("ckpt-*"):
        damage(c / "model.safetensors", "garbage")
    err = main_error(common(world, run, 8) + ["--resume"], capsys)
    assert "no intact checkpoint in" in err


# ---------------------------------------------------------------------------------------------------------------
# One run per folder; workers follow their agent

def test_a_second_run_on_a_live_folder_is_refused(world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = runs.lock_folder(out)            # this process plays the live run
    try:
        for extra in ([], ["--resume"]):
            err = main_error(common(world, out, 1) + extra, capsys)
            assert f"is in use by another run (pid {os.getpid()})" in err
    finally:
        lock.close()
    train.main(args_for(world, out, 1, "--stats", world["stats"]))       # free again: it runs


def children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_workers_stop_when_the_torchrun_agent_dies(world, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train.py"), *args_for(world, out, 100000, "--save-every", "100000", "--stats", world["stats"])]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").is_file() and time.time() < deadline:      # training has begun
            time.sleep(0.5)
        workers = children(agent.pid)
        assert workers, "no worker process found"
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 60
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(Path(f"/proc/{w}").exists() for w in workers), "the worker trains on unwatched"
    finally:
        for w in children(agent.pid) + [agent.pid]:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "stopped by the death of torchrun's agent" in (out / "log.txt").read_text()
    assert (out / "latest").is_file()                   # what it had trained is saved


# ---------------------------------------------------------------------------------------------------------------
# Moved runs, recorded paths

def test_a_moved_run_resumes_and_a_missing_recorded_part_names_its_flag(world, tmp_path, capsys):
    # --model tiny makes its frozen parts inside the run: run.json records them relative to it
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--model", "tiny", "--data", str(world["data"]), "--steps", "1", "--global-batch", "2",
            "--resolution", "64", "--system-prompt", "Picture: "]
    train.main(args + ["--out", str(a)])
    shutil.move(a, b)
    train.main(args[:args.index("--steps")] + ["--steps", "2"] + args[args.index("--steps") + 2:]
               + ["--out", str(b), "--resume"])
    assert (b / "ckpt-0000002").is_dir()
    # a frozen part outside the run that has gone: which one, and the flag that replaces it
    ae = tmp_path / "ae.ckpt"
    shutil.copyfile(world["autoencoder"], ae)
    c = tmp_path / "c"
    train.main(args_for(world, c, 1, "--stats", world["stats"], "--autoencoder", str(ae)))
    ae.unlink()
    args = args_for(world, c, 2, "--stats", world["stats"], "--resume")
    args[args.index("--autoencoder"):args.index("--autoencoder") + 2] = []
    err = main_error(args, capsys)
    assert f"records the autoencoder at {ae}, which does not exist" in err and "pass --autoencoder" in err
    # and passing it resumes (in this same process, as a notebook would: the failed run's lock is let go)
    train.main(args + ["--autoencoder", world["autoencoder"]])
    assert (c / "ckpt-0000002").is_dir()


def test_corrupt_run_json_of_a_source_names_the_file(world, tmp_path, capsys):
    src = tmp_path / "src"
    train.main(args_for(world, src, 1, "--stats", world["stats"]))
    (src / "ckpt-0000001" / "run.json").write_text("{not json")
    err = main_error(common(world, tmp_path / "dst", 1) + ["--init-from", str(src / "ckpt-0000001")], capsys)
    assert "run.json: not a valid run.json" in err


# ---------------------------------------------------------------------------------------------------------------
# Arguments

@pytest.mark.parametrize("device", ["tpu", "banana", "cuda:7", "mps", "meta", "cuda"])
def test_devices_are_checked_in_one_line(world, tmp_path, capsys, device):
    err = main_error(common(world, tmp_path / "run", 1) + ["--device", device], capsys)
    assert f"--device {device}" in err or f"--device '{device}'" in err


def test_world_size_that_does_not_divide_the_batch_names_the_valid_sizes():
    args = train.finish_args(train.parse_args(["--model", "tiny", "--data", "d", "--out", "o", "--global-batch",
                                               "16"]))
    with pytest.raises(train.UsageError, match=r"world size 3: run on 1, 2, 4, 8, 16 processes"):
        train.batch_plan(args, runs.Dist(world=3))


def test_records_without_a_prompt_are_reported_once(world, tmp_path, capsys):
    data, _ = write_dataset(tmp_path / "data", n=4, extra=[{"path": "img000.png"}, {"path": "img001.png",
                                                                                      "prompt": "   "}])
    args = common(world, tmp_path / "run", 3, 6, 6, "--stats", world["stats"])    # every record, every step
    args[args.index("--data") + 1] = data
    train.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "has no prompt" in line]
    assert len(lines) == 2 and "data.jsonl:5" in lines[0] + lines[1] and "data.jsonl:6" in lines[0] + lines[1]
    assert "(2 such records so far)" in lines[1]


def test_the_release_beside_the_command_is_used(world, tmp_path):
    # the official layout in the working directory: pre-trained/ and gemma-2-2b/
    pre = tmp_path / "pre-trained"
    (pre / "autoencoder").mkdir(parents=True)
    shutil.copyfile(world["autoencoder"], pre / "autoencoder" / "svg_autoencoder-P-stage3.ckpt")
    shutil.copyfile(world["stats"], pre / "dinov3_s16p_layer_patchtoken_stats_dist.pt")
    shutil.copytree(world["gemma"], tmp_path / "gemma-2-2b")
    r = run_cli(["--model", "toy", "--data", str(world["data"]), "--out", str(tmp_path / "run"), "--steps", "1",
                 "--global-batch", "2", "--system-prompt", "Picture: ", "--threads", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "ckpt-0000001" / "run.json").read_text())
    assert run["frozen"]["autoencoder"].endswith("pre-trained/autoencoder/svg_autoencoder-P-stage3.ckpt")
    assert run["frozen"]["gemma"].endswith("gemma-2-2b")
    assert "pre-trained/dinov3_s16p_layer_patchtoken_stats_dist.pt" in r.stdout     # not recomputed
