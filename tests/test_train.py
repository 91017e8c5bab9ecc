"""train.py: crops, caption sampling, presets, and whole tiny runs on the CPU: the loss falls, two DDP processes
match one process, a killed run resumes bit for bit, bad images are skipped, stages chain, the cache works,
sample.py's pipeline loads what train.py writes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing import loading, tiny
import data
import svgt2i
import train
from nextdit import NextDiTConfig
from tiny_nextdit import write_official_consolidated
from train_harness import instruments
from train_helpers import adam_reach, write_dataset, write_tiny_frozen

ROOT = Path(__file__).resolve().parents[1]
SHORT_SYSTEM = "Picture: "          # a short literal system prompt keeps the tiny runs fast


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py: tiny runs, one intra-op thread


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("train"))


def make_world(root):
    """A 16-image data set of three aspect ratios, tiny frozen parts, and statistics computed by train.py."""
    data, texts = write_dataset(root / "data", n=16)
    frozen = write_tiny_frozen(root / "frozen", texts)
    w = {"root": root, "data": data, **frozen}
    train.main(common(w, root / "stats-run", steps=0))
    w["stats"] = str(root / "stats-run" / "latent_stats.pt")
    return w


def common(w, out, steps=2, batch=4, micro=2, *extra):
    return ["--model", "tiny", "--data", str(w["data"]), "--out", str(out), "--autoencoder", w["autoencoder"],
            "--gemma", w["gemma"], "--steps", str(steps), "--global-batch", str(batch), "--micro-batch", str(micro),
            "--log-every", "1", "--system-prompt", SHORT_SYSTEM, *extra]


def log_records(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def run_cli(args, env_extra=None, torchrun=None, instruments=(), cwd=ROOT):
    """train.py in a subprocess (under torchrun with `torchrun` processes); with `instruments`, through the test
    harness (tests/train_harness.py: --kill-after-step N, --dump-grads)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    script = [str(ROOT / "train.py")] if not instruments else [str(ROOT / "tests" / "train_harness.py"),
                                                               *instruments, "--"]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + [*script, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


# ---------------------------------------------------------------------------------------------------------------
# Pieces

@pytest.mark.parametrize("stage, res, batch, steps, text, ratios", [(1, 256, 1536, 91000, 256, (0.1, 0.35, 0.55)),
                                                                  (2, 512, 768, 90000, 256, (0.1, 0.35, 0.55)),
                                                                  (3, 1024, 768, 44000, 256, (0.1, 0.35, 0.55)),
                                                                  (4, 1024, 768, 40000, 512, (0.0, 0.0, 1.0))])
def test_stage_presets(stage, res, batch, steps, text, ratios):
    a = train.finish_args(train.parse_args(["--stage", str(stage), "--data", "d.jsonl", "--out", "o"]))
    assert (a.resolution, a.global_batch, a.steps, a.max_text_len, a.caption_ratios) == (res, batch, steps, text, ratios)
    assert a.lr == 2e-4 and a.grad_clip == 2.0 and a.weight_decay == 0 and a.caption_dropout == 0.1
    assert a.checkpointing and train.ADAM_BETAS == (0.9, 0.95) and train.ADAM_EPS == 1e-15
    b = train.finish_args(train.parse_args(["--stage", str(stage), "--data", "d", "--out", "o", "--resolution", "320",
                                            "--max-text-len", "128", "--caption-ratios", "1,0,0", "--global-batch", "8"]))
    assert (b.resolution, b.max_text_len, b.caption_ratios, b.global_batch) == (320, 128, (1, 0, 0), 8)
    t = train.finish_args(train.parse_args(["--stage", str(stage), "--model", "tiny", "--data", "d", "--out", "o"]))
    assert t.resolution == res // 2 and t.max_text_len == text and not t.checkpointing
    toy = train.finish_args(train.parse_args(["--stage", str(stage), "--model", "toy", "--data", "d", "--out", "o"]))
    assert (toy.resolution, toy.global_batch, toy.steps, toy.lr, toy.ema_decay) == (64, 64, 2200, 1e-3, 0.999)


# ---------------------------------------------------------------------------------------------------------------
# Whole runs

def test_loss_falls(world, tmp_path):
    out = tmp_path / "run"
    train.main(common(world, out, 40, 8, 8, "--resolution", "64", "--lr", "2e-3", "--stats", world["stats"]))
    losses = [r["loss"] for r in log_records(out)]
    assert len(losses) == 40 and all(r["skipped"] == 0 for r in log_records(out))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)        # about 1.98 -> 1.35
    rec = log_records(out)[-1]
    assert rec["images_per_s"] > 0 and len(rec["loss_by_t"]) == train.T_BINS
    assert (out / "latest").read_text().strip() == "ckpt-0000040"


def test_statistics_are_computed_in_the_official_format(world):
    d = torch.load(world["stats"], weights_only=True)
    assert set(d) == {"mean", "std"} and d["mean"].shape == d["std"].shape == (1, 32)
    assert d["mean"].dtype == torch.float32
    # independently: every image's training view through the autoencoder's DINOv3, per-channel moments
    ae = loading.load_autoencoder(world["autoencoder"])
    crops = data.crop_size_list(64)
    records = data.Records(world["data"])
    feats = torch.cat([ae.encode(data.load_bucket_crop(records[i]["path"], crops)[None]).flatten(2)[0].T.double()
                       for i in range(len(records))])                    # [tokens, 32]
    torch.testing.assert_close(d["mean"][0].double(), feats.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d["std"][0].double(), feats.std(0), rtol=1e-4, atol=1e-6)
    assert len({tuple(data.load_bucket_crop(records[i]["path"], crops).shape) for i in range(3)}) == 3   # 3 aspects


def test_bf16_autocast_and_activation_checkpointing(world, tmp_path):
    out = tmp_path / "bf16"
    train.main(common(world, out, 2, 4, 2, "--precision", "bf16", "--text-dtype", "bf16", "--checkpointing",
                      "--stats", world["stats"]))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log_records(out))
    w = load_file(str(out / "ckpt-0000002/model.safetensors"))
    assert {v.dtype for v in w.values()} == {torch.float32}                  # master weights stay fp32
    run = json.loads((out / "ckpt-0000002/run.json").read_text())
    assert run["args"]["precision"] == "bf16" and run["args"]["checkpointing"] is True


def test_two_ddp_processes_match_one_process(world, tmp_path):
    """The same global batches on 1 process and on 2; compared is what is well conditioned (a wrong data split or
    reduction moves each of these by tens of per cent). Step 1 starts from equal weights: its gradients agree
    element by element (float noise: another summation order). After an AdamW step (eps 1e-15) an element whose
    gradient was float noise has moved by lr with a random sign, so later states are compared as a whole: step 2's
    gradient as one vector, the losses and gradient norms, and the weights within twice what Adam can move an
    element (train_helpers.adam_reach)."""
    args = ["--steps", "2", "--stats", world["stats"]]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    with instruments(single, dump_grads=True):
        train.main(common(world, single, 2, 4, 4) + args)              # 1 process, 1 micro-batch of 4
    r = run_cli(common(world, ddp, 2, 4, 1) + args, torchrun=2,         # 2 processes x 2 micro-batches of 1
                instruments=["--dump-grads"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replicas identical on 2 ranks" in r.stdout
    assert_grads_match(single, [ddp, ddp], ranks=(0, 1), steps=(1, 2))
    for a, b in zip(log_records(single), log_records(ddp), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ws, wd = load_file(str(single / "ckpt-0000002/model.safetensors")), load_file(str(ddp / "ckpt-0000002/model.safetensors"))
    assert_within_adam_reach(ws, wd, steps=2)


def assert_grads_match(reference, runs, ranks, steps):
    """Dumped gradients (train_harness --dump-grads) of `runs` (rank ranks[i] of runs[i]) against `reference`'s
    rank 0: identical across the runs' ranks (one all-reduced gradient); step 1 element by element (float noise
    only), later steps as one vector (1e-3 of its norm)."""
    for step in steps:
        g = load_file(str(reference / f"grads-{step:07d}-rank0.safetensors"))
        others = [load_file(str(run / f"grads-{step:07d}-rank{r}.safetensors")) for run, r in zip(runs, ranks)]
        assert all(o.keys() == g.keys() for o in others) and len(g) > 20
        assert all(torch.equal(o[k], others[0][k]) for o in others for k in g), step
        assert sum(v.abs().sum() for v in g.values()) > 0
        if step == 1:
            for k in g:
                torch.testing.assert_close(others[0][k], g[k], rtol=1e-4, atol=1e-7), k
        else:
            a, b = (torch.cat([t[k].flatten() for k in g]) for t in (others[0], g))
            assert (a - b).norm() <= 1e-3 * b.norm(), step


def assert_within_adam_reach(a, b, steps, lr=2e-4):
    """Weights of two runs from equal weights after `steps` AdamW steps (weight decay 0) at `lr` (--model tiny's
    default): no element further apart than twice what Adam can move it."""
    assert a.keys() == b.keys()
    reach = 2 * adam_reach(train.ADAM_BETAS, steps, lr)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= reach, (k, (a[k] - b[k]).abs().max().item(), reach)


def test_killed_run_resumes_bit_for_bit(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--stats", world["stats"], "--save-every", "3", "--keep", "1"]
    train.main(common(world, a, 6) + args)
    r = run_cli(common(world, b, 6) + args, instruments=["--kill-after-step", "4"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (b / "latest").read_text().strip() == "ckpt-0000003" and not (b / "ckpt-0000004").exists()
    train.main(common(world, b, 6) + args + ["--resume"])
    assert sorted(p.name for p in a.glob("ckpt-*")) == ["ckpt-0000006"]     # --keep 1
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(str(a / "ckpt-0000006" / name)), load_file(str(b / "ckpt-0000006" / name))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    oa, ob = (torch.load(d / "ckpt-0000006/optimizer.pt", weights_only=True) for d in (a, b))
    for i, s in oa["state"].items():
        assert all(torch.equal(s[k], ob["state"][i][k]) for k in s)
    sa, sb = (torch.load(d / "ckpt-0000006/state.pt", weights_only=True) for d in (a, b))
    assert (sa["step"], sa["position"], sa["ema_updates"]) == (sb["step"], sb["position"], sb["ema_updates"]) == (6, 24, 6)
    la, lb = log_records(a), log_records(b)
    assert [r["loss"] for r in la[3:]] == [r["loss"] for r in lb if r["step"] > 3][-3:]
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]        # the resumed steps are logged once
    # The weights moved, and the EMA (warm-up: decay (1 + n) / (10 + n)) differs from the model.
    first = load_file(str(a / "ckpt-0000006/model.safetensors"))
    ema = load_file(str(a / "ckpt-0000006/ema.safetensors"))
    assert not all(torch.equal(first[k], ema[k]) for k in first)


def test_bad_images_are_skipped_and_counted(world, tmp_path, capsys):
    data, _ = write_dataset(tmp_path / "data", n=6, extra=[{"path": "missing.png", "prompt": "gone"},
                                                          {"path": "corrupt.png", "prompt": "broken"},
                                                          {"path": "truncated.png", "prompt": "cut"}])
    (tmp_path / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    raw = (tmp_path / "data" / "img000.png").read_bytes()
    (tmp_path / "data" / "truncated.png").write_bytes(raw[:len(raw) // 2])
    out = tmp_path / "run"
    args = common(world, out, 3, 3, 3, "--workers", "1")
    args[args.index("--data") + 1] = data
    train.main(args)                                 # 9 records, 3 steps of 3: every record is visited once
    err = capsys.readouterr().err
    for name in ("missing.png", "corrupt.png", "truncated.png"):
        assert f"{name}: " in err
    # records 6, 7, 8 are bad and each is replaced by the next record: reading them fails 3 + 2 + 1 times
    assert log_records(out)[-1]["skipped"] == 6
    assert torch.load(out / "ckpt-0000003/state.pt", weights_only=True)["skipped"] == [6]


def test_stages_chain_with_init_from(world, tmp_path, capsys):
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    train.main(common(world, s1, 2, 4, 2, "--stats", world["stats"]))
    # stage 2: frozen parts and statistics come from stage 1's run.json; lr 0 keeps the loaded weights
    train.main(["--stage", "2", "--model", "tiny", "--data", str(world["data"]), "--out", str(s2), "--init-from", str(s1),
                "--steps", "1", "--global-batch", "2", "--lr", "0", "--resolution", "128", "--system-prompt", SHORT_SYSTEM])
    run2 = json.loads((s2 / "ckpt-0000001/run.json").read_text())
    assert run2["stage"] == 2 and run2["args"]["max_text_len"] == 256 and run2["frozen"]["gemma"] == world["gemma"]
    assert (s2 / "latent_stats.pt").read_bytes() == Path(world["stats"]).read_bytes()
    # recorded relative to the checkpoint, as it lies inside the run (a moved run still finds it)
    assert os.path.normpath(s2 / "ckpt-0000001" / run2["frozen"]["stats"]) == str(s2 / "latent_stats.pt")
    w1, w2 = load_file(str(s1 / "ckpt-0000002/model.safetensors")), load_file(str(s2 / "ckpt-0000001/model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    e2 = load_file(str(s2 / "ckpt-0000001/ema.safetensors"))
    assert all(torch.equal(w1[k], e2[k]) for k in w1)             # the EMA starts from the loaded weights
    # a different FFN width: those tensors are dropped with a warning, the rest is loaded
    capsys.readouterr()
    train.main(["--stage", "3", "--model", "tiny", "--model-config", '{"ffn_dim": 64}', "--data", str(world["data"]),
                "--out", str(s3), "--init-from", str(s2 / "ckpt-0000001"), "--steps", "1", "--global-batch", "2",
                "--lr", "0", "--resolution", "128", "--system-prompt", SHORT_SYSTEM])
    assert "mis-shaped (dropped)" in capsys.readouterr().out
    w3 = load_file(str(s3 / "ckpt-0000001/model.safetensors"))
    assert w3["layers.0.feed_forward.w1.weight"].shape[0] == 64
    kept = [k for k in w2 if "feed_forward" not in k]
    assert kept and all(torch.equal(w2[k], w3[k]) for k in kept)
    assert json.loads((s3 / "ckpt-0000001/run.json").read_text())["model"]["config"]["ffn_dim"] == 64


def test_init_from_an_official_consolidated_checkpoint(world, tmp_path):
    config = dataclasses.replace(NextDiTConfig.tiny(), in_channels=32, cap_feat_dim=32)
    official = write_official_consolidated(tmp_path / "dit-official", config, seed=3)   # a folder, upstream layout
    out = tmp_path / "ft"
    train.main(common(world, out, 1, 2, 2, "--init-from", str(official.parent), "--lr", "0", "--stats", world["stats"]))
    w = load_file(str(out / "ckpt-0000001/model.safetensors"))
    sd = torch.load(official, weights_only=True)
    assert w.keys() == sd.keys() and all(torch.equal(w[k], sd[k]) for k in sd)


def test_cache_and_stage_caption_length(world, tmp_path):
    long_caption = " ".join(f"word{i} café 東京" for i in range(300))       # far more than 512 tokens
    data, _ = write_dataset(tmp_path / "data", n=4)
    lines = Path(data).read_text().splitlines()
    lines[0] = json.dumps({"path": "img000.png", "prompt": {"short": "a thing", "long": long_caption}})
    Path(data).write_text("\n".join(lines) + "\n")
    lengths = {}
    for stage in (1, 4):       # the official trainer truncates to 256 in every stage; stage 4 must reach 512
        args = common(world, tmp_path / f"cached{stage}", 1, 2, 2, "--stage", str(stage), "--cache",
                      str(tmp_path / f"cache{stage}"), "--resolution", "128", "--stats", world["stats"])
        args[args.index("--data") + 1] = data
        train.main(args)
        cached = load_file(str(tmp_path / f"cache{stage}" / "00000" / "000000000.safetensors"))
        assert cached["latent"].shape[0] == 32 and cached["text.en.short"].shape[1] == 32
        lengths[stage] = cached["text.en.long"].shape[0]
        assert (tmp_path / f"cache{stage}" / "empty.safetensors").exists()
    assert lengths == {1: 256, 4: 512}
    # training from the cache computes what training from the images computes
    args = common(world, tmp_path / "online", 1, 2, 2, "--stage", "4", "--resolution", "128", "--stats", world["stats"])
    args[args.index("--data") + 1] = data
    train.main(args)
    torch.testing.assert_close(log_records(tmp_path / "online")[0]["loss"], log_records(tmp_path / "cached4")[0]["loss"],
                               rtol=1e-5, atol=0)


def test_sample_pipeline_loads_a_training_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    train.main(common(world, out, 2))
    ckpt = out / "ckpt-0000002"
    pipe = svgt2i.SVGT2I.from_pretrained(str(ckpt), device="cpu", dtype=torch.float32)
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.equal(pipe.dit.state_dict()[k], ema[k]) for k in ema)
    image = pipe.generate(["a red square"], height=64, width=96, steps=2, seed=0)[0]
    assert image.size == (96, 64)
    run = json.loads((ckpt / "run.json").read_text())
    # frozen parts outside the run are recorded absolute, the statistics inside it relative
    assert all(os.path.isabs(run["frozen"][k]) for k in ("autoencoder", "gemma"))
    assert not os.path.isabs(run["frozen"]["stats"]) and (ckpt / run["frozen"]["stats"]).is_file()
    assert run["resolution"] == 128 and run["model"]["preset"] == "tiny"


def test_tiny_preset_makes_its_own_frozen_parts(world, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "tiny", "--data", str(world["data"]), "--out", str(out), "--steps", "1", "--global-batch", "2",
            "--resolution", "64", "--system-prompt", SHORT_SYSTEM]
    train.main(args)                                  # tiny.make_tiny_frozen writes them into OUT/frozen
    frozen = json.loads((out / "ckpt-0000001" / "run.json").read_text())["frozen"]
    ckpt = out / "ckpt-0000001"
    assert all(os.path.normpath(ckpt / frozen[k]).startswith(str(out / "frozen"))
               for k in ("autoencoder", "dinov3", "gemma"))
    stamp = os.path.getmtime(ckpt / frozen["autoencoder"])
    train.main(args[:args.index("--steps")] + ["--steps", "2", "--resume"] + args[args.index("--steps") + 2:])
    assert json.loads((out / "ckpt-0000002" / "run.json").read_text())["frozen"] == frozen
    assert os.path.getmtime(ckpt / frozen["autoencoder"]) == stamp   # resuming reuses them


def test_errors_are_one_line_with_exit_code_2(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.png", "prompt": "x"}\nnot json\n')
    done = tmp_path / "done"
    (done).mkdir()
    (done / "latest").write_text("ckpt-0000001\n")
    cases = [
        (["--data", str(tmp_path / "nope.jsonl")], "data file not found"),
        (["--data", str(bad)], "bad.jsonl:2: not valid JSON"),
        (["--stage", "5"], "--stage 5"),
        (["--global-batch", "6", "--micro-batch", "4"], "not a multiple of --micro-batch"),
        (["--out", str(done)], "already holds a run"),
        (["--out", str(tmp_path / "empty"), "--resume"], "nothing to resume"),
        (["--max-text-len", "300"], "--max-text-len 300"),
        (["--model-config", '{"n_layerz": 2}'], "unknown NextDiTConfig fields"),
    ]
    for extra, message in cases:
        args = common(world, tmp_path / "out", 1) + extra
        with pytest.raises(SystemExit) as e:
            train.main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
    with pytest.raises(SystemExit) as e:       # the real model without its frozen parts
        train.main(["--data", str(world["data"]), "--out", str(tmp_path / "o2")])
    assert e.value.code == 2 and "missing frozen parts" in capsys.readouterr().err
