"""train.py --parallel fsdp (FSDP2, 2 CPU processes on gloo): its steps equal DDP's on the same global batch, a
killed run resumes bit for bit, checkpoints resume across world sizes (2 -> 1, 1 -> 2) and modes (FSDP -> DDP,
DDP -> FSDP on an HSDP mesh) on the same data, a damaged shard is passed over, sample.py reads an FSDP run, HSDP
replicas are compared within each shard, and the new flags fail in one line."""

import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing import release, runs, sharding
import sample
import train
from test_train import assert_grads_match, assert_within_adam_reach, common, log_records, run_cli
from test_train import world  # noqa: F401 (a fixture)

STEPS, SAVE = 6, 3
pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: tiny runs, one intra-op thread


def args_for(world, out, *extra):
    """A 6-step tiny run, global batch 4 in micro-batches of 1 (2 per rank on 2 ranks), saved every 3 steps."""
    return common(world, out, STEPS, 4, 1, "--stats", world["stats"], "--save-every", str(SAVE), "--keep", "0",
                  *extra)


def checked(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(run, step, name="model"):
    return load_file(str(Path(run) / f"ckpt-{step:07d}" / f"{name}.safetensors"))


def assert_close(a, b, steps=STEPS):
    """Weights after `steps` steps taken on differently split or reduced batches: within twice what AdamW can move an
    element (an element whose gradient is float noise moves by about lr whichever sign it got; see
    test_train.test_two_ddp_processes_match_one_process). The losses, gradients and moments, compared as a whole,
    are what tells a wrong split or reduction."""
    assert_within_adam_reach(a, b, steps)


def dcp_state(folder, tmp_path):
    """A torch.distributed.checkpoint folder as one plain dict {"model", "optim", "ema"} (torch's offline
    converter), to compare shards written by different runs."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    f = tmp_path / f"dcp-{abs(hash(str(folder)))}.pt"
    dcp_to_torch_save(str(folder), str(f))
    return torch.load(f, weights_only=False)


def flat(tree, prefix=""):
    """{"a.b": tensor} of a nested dict's tensors."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[prefix + str(k)] = v
    return out


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Runs on the same global batches: FSDP on 2 processes (Gemma sharded too) killed as step 6 begins and resumed
    from step 3 (the steps it took before the kill kept apart: killed-*), DDP on 2 processes, one process. The
    two-process runs dump their gradients."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {"fsdp": root / "fsdp", "ddp": root / "ddp", "single": root / "single"}
    fsdp = out["fsdp"]
    out["fsdp_args"] = args = args_for(world, fsdp, "--parallel", "fsdp", "--shard-text-encoder")
    r = run_cli(args, torchrun=2, instruments=["--kill-after-step", "5", "--dump-grads"])
    assert r.returncode != 0 and (fsdp / "latest").read_text().strip() == "ckpt-0000003", r.stderr[-3000:]
    out["killed"] = {"ckpts": sorted(p.name for p in fsdp.glob("ckpt-*")), "tmp": list(fsdp.glob(".tmp*"))}
    for f in [*fsdp.glob("grads-*.safetensors"), fsdp / "log.jsonl"]:
        shutil.copyfile(f, fsdp / f"killed-{f.name}")
    checked(run_cli(args + ["--resume"], torchrun=2, instruments=["--dump-grads"]))
    out["ddp_stdout"] = checked(run_cli(args_for(world, out["ddp"]), torchrun=2, instruments=["--dump-grads"])).stdout
    train.main(args_for(world, out["single"]))
    return out


def test_fsdp_steps_equal_ddp_steps(trained, tmp_path):
    fsdp, ddp = trained["fsdp"], trained["ddp"]
    # reduce-scattered, then gathered: one gradient on both ranks, DDP's (step 1 element by element, then whole)
    assert_grads_match(ddp, [fsdp, fsdp], ranks=(0, 1), steps=(1, 2, 3))
    for a, b in zip(log_records(fsdp), log_records(ddp), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for name in ("model", "ema"):
        assert_close(weights(fsdp, STEPS, name), weights(ddp, STEPS, name))
    # The FSDP checkpoint: full safetensors for sampling, the sharded state in dcp/ (one file per rank)
    ckpt = fsdp / f"ckpt-{STEPS:07d}"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "optimizer.pt").exists() and (ddp / f"ckpt-{STEPS:07d}" / "optimizer.pt").is_file()
    state = dcp_state(ckpt / "dcp", tmp_path)
    for name in ("model", "ema"):                                 # the gathered files are the shards, bit for bit
        full = weights(fsdp, STEPS, name)
        assert full.keys() == state[name].keys() and all(torch.equal(full[k], state[name][k]) for k in full)
    # the optimizer moments agree with DDP's (optimizer.pt is by parameter index, dcp/ by parameter name)
    opt = torch.load(ddp / f"ckpt-{STEPS:07d}" / "optimizer.pt", weights_only=True)
    names = [k for k in weights(ddp, STEPS) if k != "norm_final.weight"]
    for m in ("exp_avg", "exp_avg_sq"):     # as a whole: they hold later steps' gradients (compared so above)
        a, b = (torch.cat([t.flatten() for t in ts]) for ts in ([state["optim"]["state"][n][m] for n in names],
                                                                  [opt["state"][i][m] for i in range(len(names))]))
        assert (a - b).norm() <= 1e-3 * b.norm(), m
    assert torch.load(ckpt / "state.pt", weights_only=True)["parallel"] == "fsdp"
    assert "replicas identical on 2 ranks" in trained["ddp_stdout"]


def test_killed_fsdp_run_resumes_bit_for_bit(trained):
    fsdp = trained["fsdp"]
    assert trained["killed"] == {"ckpts": ["ckpt-0000003"], "tmp": []}      # nothing half-written
    # Steps 4 and 5 again after the resume from step 3: the same gradients (on both ranks), losses and norms, bit
    # for bit. Step 5's gradients follow from step 4's update, so from the restored AdamW moments too.
    for step in (4, 5):
        for rank in (0, 1):
            a = load_file(str(fsdp / f"killed-grads-{step:07d}-rank{rank}.safetensors"))
            b = load_file(str(fsdp / f"grads-{step:07d}-rank{rank}.safetensors"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, rank)
    killed = [json.loads(line) for line in open(fsdp / "killed-log.jsonl")]
    resumed = log_records(fsdp)
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5] and [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in killed] == [(r["loss"], r["grad_norm"]) for r in resumed[:5]]
    state = torch.load(fsdp / f"ckpt-{STEPS:07d}" / "state.pt", weights_only=True)
    assert (state["step"], state["position"], state["ema_updates"]) == (6, 24, 6)


def assert_continues(resumed, reference):
    """A run resumed at step 3 took steps 4-6 on the reference's data: the same losses (float tolerance), the
    same data position, weights and EMA equal to float tolerance."""
    got, want = log_records(resumed), {r["step"]: r for r in log_records(reference)}
    assert [r["step"] for r in got][-3:] == [4, 5, 6]
    for a in got[-3:]:
        assert a["loss"] == pytest.approx(want[a["step"]]["loss"], rel=1e-5), (a, want[a["step"]])
    assert torch.load(resumed / f"ckpt-{STEPS:07d}" / "state.pt", weights_only=True)["position"] == 24
    for name in ("model", "ema"):
        assert_close(weights(resumed, STEPS, name), weights(reference, STEPS, name))


def test_resume_across_world_sizes_and_modes(world, trained, tmp_path, capsys):
    # FSDP on 2 -> 1 process (DDP mode): from a copy whose newest checkpoint has a damaged shard, so the
    # checkpoint at step 3 is used
    two_to_one = tmp_path / "2to1"
    shutil.copytree(trained["fsdp"], two_to_one)
    shard = two_to_one / f"ckpt-{STEPS:07d}" / "dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    capsys.readouterr()
    train.main(args_for(world, two_to_one, "--resume"))
    captured = capsys.readouterr()
    assert "ckpt-0000006 cannot be used (dcp/__1_0.distcp is truncated)" in captured.err
    assert "ckpt-0000003 at step 3" in captured.out
    assert_continues(two_to_one, trained["single"])
    # 1 process (DDP's files) -> FSDP on 2, on a 2-D (HSDP) mesh: 1 replica of 2 shards; with activation
    # checkpointing (the same numbers, recomputed)
    one_to_two = tmp_path / "1to2"
    checked(run_cli(args_for(world, one_to_two, "--parallel", "fsdp", "--hsdp-shard", "2", "--checkpointing",
                             "--resume", str(trained["single"] / "ckpt-0000003")), torchrun=2))
    assert_continues(one_to_two, trained["single"])


def test_hsdp_replicas_of_one_shard_equal_ddp(world, trained, tmp_path):
    """The other end of the 2-D mesh: 2 replicas of 1 shard (--hsdp-shard 1), whose gradients are all-reduced
    across the replica dimension only; its first 3 steps equal DDP's."""
    run = tmp_path / "hsdp"
    r = checked(run_cli(args_for(world, run, "--parallel", "fsdp", "--hsdp-shard", "1", "--steps", str(SAVE)),
                        torchrun=2))
    assert "replicas identical on 2 ranks" in r.stdout               # 2 replicas compared: one shard each
    for name in ("model", "ema"):
        assert_close(weights(run, SAVE, name), weights(trained["ddp"], SAVE, name), steps=SAVE)
    for a, b in zip(log_records(run), log_records(trained["ddp"])[:SAVE], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_replicas_are_compared_within_each_shard():
    """check_replicas: with HSDP, rank r holds shard r % N: ranks of one shard must agree, different shards not."""
    model = torch.nn.Linear(3, 2)
    fp = torch.tensor([1, 2])

    class Ranks(runs.Dist):
        def gather(self, obj):
            return self.prints

    d = Ranks(world=4)
    for shards, prints, bad in [(2, [fp, fp + 1, fp, fp + 1], None), (2, [fp, fp + 1, fp, fp + 2], "ranks [3]"),
                                (1, [fp, fp, fp, fp], None), (1, [fp, fp, fp + 1, fp], "ranks [2]")]:
        d.prints = prints
        if bad is None:
            runs.check_replicas(model, d, shards)
        else:
            with pytest.raises(RuntimeError, match=re.escape(f"replicas diverged: {bad} differ")):
                runs.check_replicas(model, d, shards)
    runs.check_replicas(model, runs.Dist(world=4), shards=4)      # FSDP: every rank its own shard, nothing to compare


def test_sample_reads_an_fsdp_run(trained, tmp_path):
    png = tmp_path / "a.png"
    sample.main(["--ckpt", str(trained["fsdp"]), "--prompt", "a red square", "--h", "64", "--w", "96", "--steps", "2",
                 "--seed", "0", "--out", str(png)])
    from PIL import Image
    assert Image.open(png).size == (96, 64)
    from svgt2i import SVGT2I
    pipe = SVGT2I.from_pretrained(str(trained["fsdp"]), device="cpu", dtype=torch.float32)
    ema = weights(trained["fsdp"], STEPS, "ema")                       # the run folder stands for its latest
    assert all(torch.equal(pipe.dit.state_dict()[k], ema[k]) for k in ema)


def test_damaged_dcp_metadata_and_parallel_errors(world, trained, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained["fsdp"] / "ckpt-0000003", ckpt)
    assert runs.checkpoint_problem(ckpt, release.DIT_CHECKPOINT_FILES) is None
    (ckpt / "dcp" / ".metadata").write_bytes(b"\x00garbage")
    assert runs.checkpoint_problem(ckpt, release.DIT_CHECKPOINT_FILES).startswith("dcp/.metadata is missing, corrupt")
    shutil.rmtree(ckpt / "dcp")
    assert runs.checkpoint_problem(ckpt, release.DIT_CHECKPOINT_FILES) == "optimizer.pt or dcp is missing"
    misfit = ["--model-config", '{"ffn_dim": 64}', "--resume", str(trained["fsdp"] / "ckpt-0000003")]
    for extra, message in [(["--parallel", "fsdp"], "--parallel fsdp shards over processes: run it under torchrun"),
                           (["--hsdp-shard", "2"], "--hsdp-shard needs --parallel fsdp"),
                           (["--shard-text-encoder"], "--shard-text-encoder shards over processes"),
                           (misfit, "does not fit --model tiny (ValueError: Size mismatch")]:
        with pytest.raises(SystemExit) as e:
            train.main(common(world, tmp_path / "out", 1) + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    args = train.finish_args(train.parse_args(["--model", "tiny", "--data", "d", "--out", "o", "--parallel", "fsdp",
                                               "--hsdp-shard", "4"]))
    with pytest.raises(train.UsageError, match=r"--hsdp-shard 4 does not divide the world size 6: pass one of "
                                               r"1, 2, 3, 6$"):
        sharding.parallel_plan(args, runs.Dist(world=6))
    args.hsdp_shard, args.shard_text_encoder, args.cache = None, True, "cache"
    with pytest.raises(train.UsageError, match="--shard-text-encoder cannot fill a --cache"):
        sharding.parallel_plan(args, runs.Dist(world=2))


class Payload:
    """What an attacker pickles: unpickling it calls os.system, which creates `marker`."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_in_metadata(dcp, marker):
    (dcp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def plant_in_shard(dcp, marker):
    """AdamW's lr, a non-tensor value torch's planner would torch.load with weights_only=False,
    replaced by the payload: appended to a shard, the (otherwise genuine) metadata pointed at it."""
    meta = sharding.read_dcp_metadata(dcp)
    key = next(k for k in meta.storage_data if k.fqn == "optim.param_groups.0.lr")
    info, blob = meta.storage_data[key], io.BytesIO()
    torch.save(Payload(marker), blob)
    shard = dcp / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(blob.getvalue())
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    (dcp / ".metadata").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("plant", [plant_in_metadata, plant_in_shard])
def test_a_planted_pickle_in_a_sharded_checkpoint_never_runs(world, trained, tmp_path, capsys, plant):
    """torch's reader unpickles dcp/.metadata and torch.loads the shards' non-tensor values with
    weights_only=False: a planted payload ran on --resume (the check ran it first). Both are refused
    in one line naming the file, and the payload never runs: not in the check, not in the load."""
    ckpt, marker = tmp_path / "ckpt", tmp_path / "payload-ran"
    shutil.copytree(trained["fsdp"] / "ckpt-0000003", ckpt)
    assert runs.checkpoint_problem(ckpt, release.DIT_CHECKPOINT_FILES) is None
    plant(ckpt / "dcp", marker)
    with pytest.raises(SystemExit) as e:
        train.main(args_for(world, tmp_path / "out", "--resume", str(ckpt)))
    err = capsys.readouterr().err.strip()
    if plant is plant_in_metadata:       # refused by the check: an error, not "corrupt", not passed over
        want = f"{ckpt / 'dcp' / '.metadata'} names posix.system, which a checkpoint's metadata never holds"
        with pytest.raises(train.UsageError, match=re.escape(want)):
            runs.checkpoint_problem(ckpt, release.DIT_CHECKPOINT_FILES)
        model = torch.nn.Linear(2, 2)                          # and by the loader on its own
        with pytest.raises(train.UsageError, match=re.escape(want)):
            sharding.load_sharded(ckpt / "dcp", model, torch.optim.AdamW(model.parameters()))
    else:                                # the check reads no values: the load refuses it
        want = (f"{ckpt / 'dcp'}: the value optim.param_groups.0.lr in its shards holds Python objects "
                "(torch refused GLOBAL posix.system)")
        assert runs.checkpoint_problem(ckpt, release.DIT_CHECKPOINT_FILES) is None
    assert e.value.code == 2 and want in err and len(err.splitlines()) == 1, err
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))       # the test's own control: the payload does run
    assert marker.exists()


def test_shard_gathers_bf16_reduces_fp32_and_composes_with_checkpointing():
    """sharding.shard on a one-rank gloo group: the blocks compute with bf16 weights (norms' weights fp32, as autocast
    keeps them) while the master weights and their gradients stay fp32, t and the joint residual stream stay fp32
    as under DDP + autocast (cast_forward_inputs=False), activation checkpointing runs, and the loss is the
    unsharded model's under autocast (before norms were kept fp32 it differed by 1e-3)."""
    import torch.distributed as dist
    from nextdit import NextDiT, NextDiTConfig
    from svgt2i import flow_matching_loss
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = NextDiT(NextDiTConfig.tiny())
        with torch.no_grad():                    # away from the zero init, so every weight gets a gradient
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape))
        model.norm_final.requires_grad_(False)
        model.grad_checkpointing = True
        plain = NextDiT(NextDiTConfig.tiny())
        plain.load_state_dict(model.state_dict())
        sharding.shard(model, [*model.noise_refiner, *model.context_refiner, *model.layers], sharding.device_mesh(runs.Dist()),
                   bf16=True)
        seen = {}
        model.layers[0].attention.qkv.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight.dtype))
        model.layers[0].attention_norm1.register_forward_pre_hook(lambda m, a: seen.update(norm=m.weight.dtype))
        model.cap_embedder[0].register_forward_pre_hook(lambda m, a: seen.update(root_norm=m.weight.dtype))
        model.layers[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0].dtype))
        model.t_embedder.register_forward_pre_hook(lambda m, a: seen.update(t=a[0].dtype))
        calls = []
        model.layers[1].register_forward_pre_hook(lambda m, a: calls.append(1))
        g = torch.Generator().manual_seed(1)
        x1, noise = ([torch.randn(8, 4, 2 + 2 * i, generator=g) for i in range(2)] for _ in range(2))
        t, caps, mask = torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g), torch.ones(2, 5, dtype=torch.bool)
        losses = []
        for m in (model, plain):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = flow_matching_loss(m, x1, noise, t, caps, mask).mean()
            loss.backward()
            losses.append(loss.item())
        assert seen == {"w": torch.bfloat16, "x": torch.float32, "t": torch.float32, "norm": torch.float32,
                        "root_norm": torch.float32}
        assert len(calls) == 2                              # checkpointed: run again in the backward
        assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters() if p.grad is not None} \
            == {torch.float32}
        # what DDP computes: autocast rounds the matmuls' weights to bf16 as the gather did, norms stay fp32
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    finally:
        dist.destroy_process_group()
