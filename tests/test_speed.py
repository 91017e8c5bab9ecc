"""Speed work, checked on the CPU: the FLOP formula against torch's FLOP counter; regional
compile (one graph serves every layer, no graph breaks, eager's numbers, the --compile flags);
sampling steps free of host syncs; split CFG equal to the batched one; the channels-last decoder;
and bench/bench_gpu.py --tiny."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import nextdit
from plumbing import runs
import sample
import train
from nextdit import NextDiT, NextDiTConfig
from plumbing.loading import load_decoder, load_latent_stats
from svgt2i import Guidance, guided_velocity
from test_nextdit import TINY, captions, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "assets", "toy")


@pytest.fixture
def fresh_dynamo():
    """Compiled graphs are cached per code object, across models: each test starts and ends
    empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_flops_formula_counts_the_forward(monkeypatch):
    """NextDiTConfig.flops is every matmul FLOP of a forward (torch's counter) and attention's
    4 * S_q * S_k * D per call (from the calls' shapes: the counter skips the CPU kernel), less the
    per-sample terms."""
    attention, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        attention.append(4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3])
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(nextdit.F, "scaled_dot_product_attention", spy)
    cap_len, h, w = 5, 3, 4
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tiny_model()(torch.randn(1, 8, h, w), torch.rand(1), *captions([cap_len], cap_len))
    c, T = TINY, TINY.t_dim
    adaln = 2 * T * c.dim * (4 * (c.n_layers + c.n_refiner_layers) + 1)  # 4 dim a block, 1 final
    per_sample = 2 * (256 * T + T * T) + adaln                           # + the timestep MLP
    assert counter.get_total_flops() + sum(attention) == c.flops(cap_len, h * w) + per_sample
    assert len(attention) == c.n_layers + 2 * c.n_refiner_layers
    # the released model at 1024x1024 with 256 caption tokens: the 23.8 TFLOP of issue 17
    flops = NextDiTConfig.from_name("2b").flops(256, 64 * 64)
    assert flops / 1e12 == pytest.approx(23.84, abs=0.01)


def test_compiled_blocks_one_graph_for_all_layers_and_eager_numbers(fresh_dynamo):
    """Regional compile: with more layers than dynamo's default recompile limit (8), the blocks
    compile to one graph per kind (context refiner, noise refiner, joint layers), reused by every
    layer and step, and the compiled forward computes eager's numbers."""
    model = tiny_model(replace(TINY, n_layers=10))
    x, ts = torch.randn(2, 8, 3, 4), [torch.tensor([0.2, 0.2]), torch.tensor([0.7, 0.7])]
    feats, mask = captions([5, 2], 5)
    with torch.no_grad():
        ref = [model(x, t, context=model.context(feats, mask, [(3, 4)] * 2)) for t in ts]
        graphs = []
        model.compile_blocks(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
        ctx = model.context(feats, mask, [(3, 4)] * 2)
        out = [model(x, t, context=ctx) for t in ts]
    assert len(graphs) == 3
    assert not any("_orig_mod" in k for k in model.state_dict())      # checkpoints keep their keys
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_forward_with_context_has_no_graph_breaks(fresh_dynamo):
    """Given a precomputed context, the whole forward is one graph (CFG-like padded captions: the
    masked path)."""
    model = tiny_model()
    feats, mask = captions([5, 2], 5)
    ctx = model.context(feats, mask, [(3, 4)] * 2)
    with torch.no_grad():
        x, t = torch.randn(2, 8, 3, 4), torch.rand(2)
        explained = torch._dynamo.explain(model)(x, t, context=ctx)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compile_flags_reach_the_model(monkeypatch, tmp_path):
    """sample.py --compile and train.py --compile compile the DiT's blocks (recorded here, not
    compiled: the compiled numbers are the tests above)."""
    calls = []
    monkeypatch.setattr(NextDiT, "compile_blocks", lambda self, **kw: calls.append(kw) or self)
    sample.main(["--toy", "--prompt", "two red circles on the left", "--steps", "1", "--seed", "0",
                 "--out", str(tmp_path / "a.png"), "--compile"])
    assert calls == [{}] and Image.open(tmp_path / "a.png").size == (64, 64)
    for flag, expected in (([], 1), (["--compile"], 2)):
        args = ["--model", "tiny", "--data", "d.jsonl", "--out", "o", *flag]
        args = train.finish_args(train.parse_args(args))
        train.build_model(args, NextDiTConfig.tiny(), runs.Dist(), None, bf16=False)   # one CPU process
        assert len(calls) == expected                                 # only with the flag


@pytest.mark.parametrize("split", [False, True])
def test_sampling_steps_make_no_host_syncs_and_one_context(split, monkeypatch):
    """After the first step, a guided sampling step converts no tensor to a Python value (no
    device sync) and rebuilds nothing: NextDiT.context (refined captions, RoPE tables, masks)
    runs once per row range."""
    model, contexts = tiny_model(), []
    real = model.context
    monkeypatch.setattr(model, "context", lambda *a: contexts.append(1) or real(*a))
    feats, mask = captions([5, 3, 1, 1], 5)              # 2 prompts, then their empty negatives
    velocity = guided_velocity(model, feats, mask, Guidance(), split=split)
    x = torch.randn(2, 8, 3, 4)

    def refuse(*args, **kwargs):
        raise AssertionError("a sampling step converted a tensor to a Python value")
    with torch.no_grad():
        first = velocity(x, 0.1)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            later = [velocity(x, t) for t in (0.5, 0.9)]
    assert len(contexts) == (2 if split else 1)
    assert all(torch.isfinite(v).all() and not torch.equal(v, first) for v in later)


def test_split_cfg_equals_batched_cfg():
    """Cond and uncond as two forwards (each unpadded for one image) = one masked batch, to
    rounding."""
    model = tiny_model()
    feats, mask = captions([5, 3, 1, 1], 5)
    x = torch.randn(2, 8, 3, 4)
    with torch.no_grad():
        for guidance, t in ((Guidance(), 0.2), (Guidance(scale=2.0, renorm=0.0), 0.7)):
            batched = guided_velocity(model, feats, mask, guidance)(x, t)
            split = guided_velocity(model, feats, mask, guidance, split=True)(x, t)
            torch.testing.assert_close(split, batched, atol=1e-5, rtol=1e-5)


def test_decoder_channels_last_fp32_within_one_level():
    """The toy's trained decoder in channels-last fp32: every pixel within 1/255 of the default
    layout (in fact float rounding); switching back gives the default's bits."""
    dec = load_decoder(os.path.join(TOY, "autoencoder.safetensors"))
    C = dec.config.z_channels
    stats = load_latent_stats(os.path.join(TOY, "latent_stats.pt"), channels=C)
    z = stats.denormalize(torch.randn(2, C, 4, 5))
    with torch.no_grad():
        ref = dec(z)
        fast = dec.use_channels_last()(z)
        back = dec.use_channels_last(False)(z)
    assert fast.shape == ref.shape == (2, 3, 64, 80) and fast.is_contiguous()
    assert (fast - ref).abs().max() <= 1 / 255 and (fast - ref).abs().max() < 1e-4
    levels = [((im.clamp(-1, 1) + 1) * 127.5).round() for im in (fast, ref)]
    assert (levels[0] - levels[1]).abs().max() <= 1
    assert torch.equal(back, ref)


BENCH_ROWS = ["bf16 matmul (ceiling)", "sample 1024 cfg batch", "sample 1024 cfg split",
              "sample 512 cfg batch", "sample 512 cfg split", "Gemma-2 encode",
              "decode 1024 float32", "decode 1024 bfloat16", "decode 1024 float32 channels-last",
              "decode 1024 bfloat16 channels-last", "12 GB path: 1024, offload, bf16 decode",
              "train 256 checkpointing on", "train 256 checkpointing off",
              "sample 1024 cfg batch compiled", "sample 1024 cfg split compiled",
              "train 256 checkpointing on compiled", "compiled graphs"]
# the cells each row must fill with a finite positive number, by the start of its name
NUMBERS = {"sample": ["s/image", "s/step", "TFLOP/s", "MFU", "peak GiB"],
           "train": ["s/step", "images/s", "TFLOP/s", "MFU", "peak GiB"],
           "decode": ["s/image", "peak GiB"], "Gemma": ["s/image", "peak GiB"],
           "bf16 matmul": ["TFLOP/s", "MFU"], "12 GB": ["peak GiB"], "compiled graphs": []}


def test_bench_gpu_tiny_prints_every_row(tmp_path):
    """bench/bench_gpu.py --tiny: the GPU benchmark's code on the CPU. Every row is there, none
    failed or was skipped, and its numbers are finite (not timed: the CI smoke test of the one GPU
    command)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_gpu.py"), "--tiny", "--json",
           str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("| case |")))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    table = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
             for line in lines[head + 2:]]
    assert [row["case"] for row in table] == BENCH_ROWS
    for row in table:
        assert "failed" not in row["notes"] and "skipped" not in row["notes"], row
        for column in next(v for k, v in NUMBERS.items() if row["case"].startswith(k)):
            value = float(row[column].rstrip("%"))
            assert math.isfinite(value) and value > 0, (row["case"], column, row[column])
        if row["case"].startswith("sample") and not row["case"].endswith("compiled"):
            assert "attention alone: yes" in row["notes"], row      # no math-kernel fallback
    rows = json.loads(out.read_text())["rows"]
    assert [row["case"] for row in rows] == BENCH_ROWS
    # compiled by the eager backend: eager's velocity, and eager's losses at the first and fifth
    # training step
    assert {row["case"]: len(row["vs eager"]) for row in rows if "vs eager" in row} == {
        "sample 1024 cfg batch compiled": 1, "sample 1024 cfg split compiled": 1,
        "train 256 checkpointing on compiled": 2}
    assert max(max(row.get("vs eager", [0])) for row in rows) < 1e-6
