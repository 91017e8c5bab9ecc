"""
The GPU benchmark: one command, under 5 minutes on one H100/H200. Full-size models are made from
random weights on the device (meta device, then to_empty and a random fill there: no files, no
host copy) and one table is printed.

    python bench/bench_gpu.py [--json bench_gpu.json] [--budget 260] [--no-compile]
    python bench/bench_gpu.py --tiny      # the same code on the CPU, tiny models, seconds (CI)

Rows, in this order (the first are the most wanted, so a short budget loses the last):
- the device's bf16 matmul rate (8192^3), the ceiling that MFU's datasheet peak is compared with;
- 50-step CFG Euler sampling of one image at 1024 and 512 (the DiT part of SVGT2I.generate:
  guided_velocity and euler_sample; captions of 256 tokens, the default empty negative of 1
  token), as one masked batch of 2 and as split cond / uncond forwards (--split-cfg);
- Gemma-2 encoding one image's captions; the decoder at 1024 in fp32 and bf16, each in the
  default and the channels-last layout, with the largest change of any pixel against fp32;
- the 12 GB path: SVGT2I.generate at 1024 with offload=True and a bf16 decoder (peak memory);
- a stage-1 training step (256 px, micro-batch 48, bf16 autocast, fused AdamW, EMA) with
  activation checkpointing on and off (off halves the micro-batch until it fits);
- with --compile (default): sampling at 1024 and a training step with the blocks compiled
  (NextDiT.compile_blocks), and the compiled velocity's difference from eager.

FLOPs are NextDiTConfig.flops (valid tokens only, no recomputation); MFU is those FLOPs per second
over the device's dense bf16 peak (runs.PEAK_TFLOPS, or --peak-tflops). Every timing
synchronizes the device and follows a warm-up. Each row runs in its own try: a failure (out of
memory, a compile error) is printed in its row and the run goes on; a row that would overrun
--budget is skipped; and a watchdog prints the table and exits if the run overruns the budget
by --grace seconds. Peak memory is torch.cuda.max_memory_allocated over the row (the models the
row uses are resident; nothing else is); on the CPU the process's peak RSS.
"""

import argparse
import copy
import gc
import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decoder import Decoder, DecoderConfig  # noqa: E402
from gemma2 import Gemma2, Gemma2Config  # noqa: E402
from nextdit import NextDiT, NextDiTConfig  # noqa: E402
from svgt2i import (SVGT2I, Autoencoder, Guidance, LatentStats, TextEncoder,  # noqa: E402
                    euler_sample, flow_matching_loss, guided_velocity)
from plumbing.runs import peak_flops
from train import ADAM_BETAS, ADAM_EPS, train_flops, update_ema  # noqa: E402

GIB = 2 ** 30
COLUMNS = ("case", "s/image", "s/step", "images/s", "TFLOP/s", "MFU", "peak GiB", "notes")


@dataclass
class Spec:
    """What is measured: the models, sizes and batches (full size, or tiny for --tiny)."""
    dit: NextDiTConfig
    gemma: Gemma2Config
    decoder: DecoderConfig
    sides: dict            # row label -> image side in px
    steps: int             # sampling steps per image
    cap_len: int           # caption tokens of the prompt (the negative has 1)
    train_side: int        # stage-1 training resolution
    train_batch: int       # micro-batch
    matmul: int            # side of the matmul ceiling's square matrices
    pipeline_steps: int    # steps of the 12 GB path (it measures memory)
    device: torch.device
    dtype: torch.dtype     # sampling DiT and Gemma


def make_spec(tiny, device):
    if tiny:
        dit = replace(NextDiTConfig.tiny(), cap_feat_dim=Gemma2Config.tiny().hidden_size)
        return Spec(dit, Gemma2Config.tiny(), DecoderConfig.tiny(z_channels=dit.in_channels),
                    {"1024": 32, "512": 16}, 3, 6, 32, 4, 64, 2, device, torch.float32)
    return Spec(NextDiTConfig.from_name("2b"), Gemma2Config.gemma2_2b(),
                DecoderConfig.autoencoder_p(), {"1024": 1024, "512": 512}, 50, 256, 256, 48,
                8192, 4, device, torch.bfloat16)


# -------------------------------------------------------------------------------------------------
# Measuring: device clocks, memory, the table, the budget


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device):
    free_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB   # process peak RSS


def timed(fn, device, warmup=1, repeat=3):
    """Median seconds of fn() over `repeat` synchronized calls after `warmup` calls; and its
    last result."""
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


class Table:
    """The rows so far; each is printed as it comes (stdout, so the final table is the last
    thing written) and the JSON file rewritten."""

    def __init__(self, json_path, header):
        self.rows, self.json_path, self.header = [], json_path, header
        self.lock, self.t0 = threading.Lock(), time.monotonic()

    def add(self, case, **cells):
        with self.lock:
            row = {"case": case, **cells}
            self.rows.append(row)
            cells = " | ".join(f"{k}={fmt(v)}" for k, v in row.items())
            print(f"row at {time.monotonic() - self.t0:.0f} s: {cells}", flush=True)
            if self.json_path:
                Path(self.json_path).write_text(json.dumps({"header": self.header,
                                                            "rows": self.rows}, indent=1))

    def render(self):
        with self.lock:
            lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            for row in self.rows:
                cells = [fmt(row.get(c)) for c in COLUMNS]
                mfu = row.get("MFU")
                cells[COLUMNS.index("MFU")] = "-" if mfu is None else f"{fmt(100 * mfu)}%"
                lines.append("| " + " | ".join(cells) + " |")
            return "\n".join(lines)


class Budget:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def start_watchdog(table, seconds):
    """After `seconds`, print the table so far and end the process (a stuck compile or kernel
    must not cost the whole run)."""
    def fire():
        print(f"\nwatchdog: {seconds:.0f} s passed, stopping; the rows so far:", flush=True)
        print(table.render(), flush=True)
        os._exit(3)
    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def attempt(table, case, fn, budget, need=0.0):
    """One row: fn() -> its cells. Skipped when fewer than `need` seconds of budget are left; a
    failure is written into the row and the run goes on."""
    if budget.left() < need:
        table.add(case, notes=f"skipped: {budget.left():.0f} s of the budget left, needs {need}")
        return
    error = None
    try:
        cells = fn()
    except Exception as e:      # out of memory, compile errors, ...: report and continue
        error = f"failed: {type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:160]}"
    if error:                   # outside the except block, so the traceback's tensors are freed
        table.add(case, notes=error)
        free_memory()
    else:
        table.add(case, **cells)


# -------------------------------------------------------------------------------------------------
# Models from random weights, made on the device


def random_model(cls, config, device, dtype, seed=0):
    """cls(config) on the meta device, materialised on `device` in `dtype` and filled there:
    weights N(0, 1 / fan_in), norm weights N(1, 0.1^2), biases N(0, 0.02^2). Random, not the
    zero-heavy training init: matmuls on zeros run faster than on data."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("bias"):
                p.normal_(0, 0.02, generator=g)
            else:
                p.normal_(1, 0.1, generator=g)
    return model.eval()


class LengthTokenizer:
    """Stands in for Gemma2Tokenizer without a file: a prompt is `cap_len` token ids (BOS first),
    the empty negative is BOS alone; right-padded to a multiple of 8, as the real one."""

    def __init__(self, cap_len, vocab_size):
        self.cap_len, self.vocab_size = cap_len, vocab_size

    def __call__(self, texts, max_length=512):
        lens = [min(self.cap_len, max_length) if t else 1 for t in texts]
        T = -(-max(lens) // 8) * 8
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(4, self.vocab_size, (len(texts), T), generator=g)
        mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]
        ids[:, 0] = 2
        return ids.masked_fill(~mask, 0), mask.long()


def captions(lens, width, device, dtype, seed=0):
    """Random caption features [B, max(lens), width] and their right-padded mask [B, L]."""
    g = torch.Generator(device).manual_seed(seed)
    feats = torch.randn(len(lens), max(lens), width, generator=g, device=device, dtype=dtype)
    lens = torch.tensor(lens, device=device)
    return feats, torch.arange(feats.shape[1], device=device)[None] < lens[:, None]


# -------------------------------------------------------------------------------------------------
# The rows


def mfu_cells(flops, seconds, peak):
    """Achieved TFLOP/s and MFU of `flops` model FLOPs done in `seconds`."""
    return {"TFLOP/s": flops / seconds / 1e12, "MFU": flops / seconds / peak if peak else None}


def matmul_row(spec, peak):
    """The bf16 matmul rate on random data: the ceiling the datasheet peak should be read
    against."""
    n, dev = spec.matmul, spec.device
    g = torch.Generator(dev).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(2))
    s, _ = timed(lambda: a @ b, dev, warmup=3, repeat=10)
    return {**mfu_cells(2 * n ** 3, s, peak), "notes": f"{n}x{n}x{n}, median of 10"}


def sample_row(dit, spec, side, split, budget, peak, probes):
    """One image, spec.steps CFG Euler steps with the default guidance (4, renorm 1): the DiT part
    of SVGT2I.generate. probes[(side, split)] holds the first velocity seen for this case; a later
    row (compiled) reports its relative difference from it."""
    dev, cfg, h = spec.device, dit.config, side // 16
    feats, mask = captions([spec.cap_len, 1], cfg.cap_feat_dim, dev, spec.dtype)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, cfg.in_channels, h, h, generator=g, device=dev)

    def run(steps):
        """Seconds of the whole run (NextDiT.context included) and up to the end of step 1."""
        velocity = guided_velocity(dit, feats, mask, Guidance(), dtype=spec.dtype, split=split)
        marks = []

        def stamp(i, n):
            if i == 1:
                sync(dev)
                marks.append(time.perf_counter())
        sync(dev)
        t0 = time.perf_counter()
        euler_sample(velocity, x, steps, 10.0, callback=stamp)
        sync(dev)
        return time.perf_counter() - t0, marks[0] - t0

    with torch.no_grad():
        warm, warm_first = run(2)               # warm-up: kernels chosen, compiled blocks compile
        n, est = spec.steps, max(warm - warm_first, 1e-6)
        if n * est > budget.left() - 20:        # keep the budget: fewer steps, then extrapolate
            n = max(3, int((budget.left() - 20) / est))
        reset_peak(dev)
        total, first = run(n)
        peak_mem = peak_gib(dev)
        s_step = (total - first) / (n - 1)
        s_image = total if n == spec.steps else first + (spec.steps - 1) * s_step
        v = guided_velocity(dit, feats, mask, Guidance(), dtype=spec.dtype, split=split)(x, 0.5)
    notes = [f"warm-up 2 steps {warm:.1f} s"]
    if n != spec.steps:
        notes.append(f"s/image from {n} steps")
    ref, cells = probes.setdefault((side, split), v), {}
    if ref is v:                # eager: which attention kernels can serve it
        notes.append(fused_attention(dit, feats, mask, x, spec, split))
    else:
        cells["vs eager"] = [float((v - ref).norm() / ref.norm())]
        notes.append(f"velocity vs eager: rel. diff {cells['vs eager'][0]:.1e}")
    if not torch.isfinite(v).all():
        notes.append("NON-FINITE velocity")
    flops = spec.steps * (cfg.flops(spec.cap_len, h * h) + cfg.flops(1, h * h))
    return {"s/image": s_image, "s/step": s_step, **mfu_cells(flops, s_image, peak),
            "peak GiB": peak_mem, "notes": "; ".join(notes), **cells}


def fused_attention(dit, feats, mask, x, spec, split):
    """Whether a step runs on fused attention kernels alone (SDPA's math kernel, which
    materialises the scores, excluded): with split forwards (no mask) flash alone; batched
    (masked joint attention) any but math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    allowed = [SDPBackend.FLASH_ATTENTION]
    if not split:
        allowed += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    velocity = guided_velocity(dit, feats, mask, Guidance(), dtype=spec.dtype, split=split)
    try:
        with sdpa_kernel(allowed):
            velocity(x, 0.5)
    except RuntimeError:
        return f"{'flash' if split else 'fused'} attention alone: no (needs the math kernel)"
    return f"{'flash' if split else 'fused'} attention alone: yes"


def gemma_row(spec):
    """Gemma-2 encoding one image's captions (the prompt and the empty negative)."""
    dev = spec.device
    gemma = random_model(Gemma2, spec.gemma, dev, spec.dtype, seed=3)
    text = TextEncoder(LengthTokenizer(spec.cap_len, spec.gemma.vocab_size), gemma)
    reset_peak(dev)
    s, (feats, mask) = timed(lambda: text(["a prompt", ""]), dev, warmup=1, repeat=5)
    finite = bool(torch.isfinite(feats[mask]).all())
    return {"s/image": s, "peak GiB": peak_gib(dev),
            "notes": f"{spec.cap_len} + 1 tokens, padded to {feats.shape[1]}; finite {finite}"}


def levels(image):
    """An image in [-1, 1] as the PNG's 0..255 levels (tensor_to_images' rounding)."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round()


def decoder_rows(table, spec, budget):
    """The decoder at 1024 in fp32 and bf16, default and channels-last layout; each row's largest
    pixel change against the fp32 default."""
    dev, side = spec.device, spec.sides["1024"]
    base = random_model(Decoder, spec.decoder, dev, torch.float32, seed=2)
    g = torch.Generator(dev).manual_seed(0)
    z = torch.randn(1, spec.decoder.z_channels, side // 16, side // 16, generator=g, device=dev)
    ref = []
    for dtype, layout in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True),
                          (torch.bfloat16, True)):
        def row():
            dec = copy.deepcopy(base).to(dtype).use_channels_last(layout)
            reset_peak(dev)
            with torch.no_grad():
                s, out = timed(lambda: dec(z), dev)
            if not ref:
                ref.append(levels(out))
            change = float((levels(out) - ref[0]).abs().max())
            return {"s/image": s, "peak GiB": peak_gib(dev),
                    "notes": f"max pixel change vs fp32: {change:.0f} levels"}
        name = f"decode 1024 {str(dtype)[6:]}{' channels-last' if layout else ''}"
        attempt(table, name, row, budget, need=5)
    del base


def pipeline_row(spec, dit):
    """The 12 GB path: SVGT2I.generate at 1024 with Gemma offloaded after encoding and a bf16
    decoder. Peak memory until the end of step 1 (Gemma and the DiT resident, then Gemma moved
    to the CPU) and after it (sampling and decoding)."""
    dev, side, C = spec.device, spec.sides["1024"], spec.dit.in_channels
    gemma = random_model(Gemma2, spec.gemma, dev, spec.dtype, seed=3)
    dec = random_model(Decoder, spec.decoder, dev, torch.bfloat16, seed=2)
    text = TextEncoder(LengthTokenizer(spec.cap_len, spec.gemma.vocab_size), gemma)
    pipe = SVGT2I(dit, Autoencoder(dec).to(dev), LatentStats(torch.zeros(C), torch.ones(C)), text,
                  device=dev, dtype=spec.dtype)
    phases = []

    def progress(idx, i, n):
        if i == 1:
            phases.append(peak_gib(dev))
            reset_peak(dev)
    reset_peak(dev)
    sync(dev)
    t0 = time.perf_counter()
    images = pipe.generate(["a prompt"], height=side, width=side, seed=0, offload=True,
                           steps=spec.pipeline_steps, progress=progress)
    sync(dev)
    wall = time.perf_counter() - t0
    phases.append(peak_gib(dev))
    reserved = torch.cuda.max_memory_reserved(dev) / GIB if dev.type == "cuda" else phases[-1]
    assert images[0].size == (side, side)
    return {"peak GiB": max(phases),
            "notes": f"{spec.pipeline_steps} steps {wall:.1f} s (memory, not speed); peak to "
                     f"step 1 {phases[0]:.2f}, after {phases[1]:.2f} (reserved {reserved:.2f})"}


def train_data(spec, batch):
    """A stage-1 micro-batch: square latents, captions of 1/4 to all of cap_len tokens (10% of
    them dropped to the 1-token empty caption, as caption dropout), t uniform."""
    dev, cfg, h = spec.device, spec.dit, spec.train_side // 16
    g = torch.Generator().manual_seed(1)
    lens = [1 if torch.rand(1, generator=g) < 0.1 else
            int(torch.randint(spec.cap_len // 4, spec.cap_len + 1, (1,), generator=g))
            for _ in range(batch)]
    feats, mask = captions(lens, cfg.cap_feat_dim, dev, spec.dtype, seed=1)
    x1 = torch.randn(batch, cfg.in_channels, h, h, generator=g).to(dev)
    noise = torch.randn(batch, cfg.in_channels, h, h, generator=g).to(dev)
    return list(x1), list(noise), torch.rand(batch, generator=g).to(dev), feats, mask, lens


def train_step(model, params, opt, ema, data):
    """train.py's step: bf16 autocast (on GPU), per-sample flow-matching loss, clipping, AdamW,
    EMA."""
    x1, noise, t, feats, mask, _ = data
    with torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=t.device.type == "cuda"):
        losses = flow_matching_loss(model, x1, noise, t, feats, mask)
    (losses.sum() / len(x1)).backward()
    torch.nn.utils.clip_grad_norm_(params, 2.0)
    opt.step()
    update_ema(ema, model, 0.9999)
    opt.zero_grad(set_to_none=True)
    return losses


def train_row(spec, checkpointing, peak, probes, compile_kw=None):
    """A stage-1 training step of the fp32-master DiT. Out of memory: the micro-batch is halved
    until it fits (the row says so). probes: the first step's losses per micro-batch size, which
    a later row (compiled, from the same init and data) is compared with."""
    dev, cfg = spec.device, spec.dit
    model = random_model(NextDiT, cfg, dev, torch.float32, seed=1).train()
    model.grad_checkpointing = checkpointing
    model.norm_final.requires_grad_(False)     # unused by forward, as in train.build_model
    if compile_kw is not None:
        model.compile_blocks(**compile_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=ADAM_BETAS, eps=ADAM_EPS,
                            fused=dev.type == "cuda")
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    batch, notes = spec.train_batch, []
    while True:
        try:
            data = train_data(spec, batch)
            t0 = time.perf_counter()
            first = train_step(model, params, opt, ema, data).detach()  # optimizer state; compiles
            warm = time.perf_counter() - t0
            reset_peak(dev)
            s, losses = timed(lambda: train_step(model, params, opt, ema, data), dev)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        data = None
        opt.zero_grad(set_to_none=True)
        reset_peak(dev)
        notes.append(f"{batch} ran out of memory")
        batch //= 2
    notes += [f"micro-batch {batch}", f"warm-up step {warm:.1f} s"]
    seen, cells = torch.stack([first, losses.detach()]), {}  # the first and the last step's
    ref = probes.setdefault(("train", batch, checkpointing), seen)
    if ref is not seen:                               # same init and data: compiled vs eager
        cells["vs eager"] = ((seen - ref).norm(dim=1) / ref.norm(dim=1)).tolist()
        notes.append("losses vs eager: rel. diff first {:.1e}, step 5 {:.1e}"
                     .format(*cells["vs eager"]))
    if not torch.isfinite(losses).all():
        notes.append("NON-FINITE loss")
    flops = train_flops(cfg, data[-1], [(spec.train_side // 16) ** 2] * batch)
    return {"s/step": s, "images/s": batch / s, **mfu_cells(flops, s, peak),
            "peak GiB": peak_gib(dev), "notes": "; ".join(notes), **cells}


# -------------------------------------------------------------------------------------------------
# The run


def sampling_rows(table, spec, budget, peak, state, label="", need=0):
    for name, side in spec.sides.items():
        for split in (False, True):
            case = f"sample {name} cfg {'split' if split else 'batch'}{label}"
            attempt(table, case, lambda: sample_row(dit_for(state, spec), spec, side, split,
                                                    budget, peak, state["probes"]),
                    budget, need=need or (20 if name == "1024" else 8))


def dit_for(state, spec):
    """The bf16 sampling DiT, made once (and again after the training rows freed it)."""
    if state.get("dit") is None:
        state["dit"] = random_model(NextDiT, spec.dit, spec.device, spec.dtype)
    return state["dit"]


def run_rows(table, spec, budget, peak, args):
    state = {"probes": {}}
    attempt(table, "bf16 matmul (ceiling)", lambda: matmul_row(spec, peak), budget)
    sampling_rows(table, spec, budget, peak, state)
    state["dit"] = None         # the other rows' peaks hold their own models only
    attempt(table, "Gemma-2 encode", lambda: gemma_row(spec), budget, need=10)
    decoder_rows(table, spec, budget)
    attempt(table, "12 GB path: 1024, offload, bf16 decode",
            lambda: pipeline_row(spec, dit_for(state, spec)), budget, need=20)
    state["dit"] = None
    for ckpt in (True, False):
        attempt(table, f"train 256 checkpointing {'on' if ckpt else 'off'}",
                lambda: train_row(spec, ckpt, peak, state["probes"]), budget, need=20)
    if not args.compile:
        return
    # Compiled: the blocks compile lazily, in each row's warm-up (its notes give the time)
    kw = {k: v for k, v in (("backend", args.compile_backend), ("mode", args.compile_mode)) if v}
    if args.compile_dynamic:
        kw["dynamic"] = args.compile_dynamic == "true"
    if budget.left() > 60:
        dit_for(state, spec).compile_blocks(**kw)
    one = replace(spec, sides={"1024": spec.sides["1024"]})
    sampling_rows(table, one, budget, peak, state, label=" compiled", need=60)
    graphs = unique_graphs()
    state["dit"] = None
    attempt(table, "train 256 checkpointing on compiled",
            lambda: train_row(spec, True, peak, state["probes"], compile_kw=kw), budget, need=60)
    table.add("compiled graphs", notes=f"torch.compile {kw or 'defaults'}: {graphs} for "
              f"sampling, {unique_graphs() - graphs} for training (one per block kind and shape)")


def unique_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def header_lines(spec, peak_note, args):
    dev = spec.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    cuda = f"CUDA {torch.version.cuda}, " if dev.type == "cuda" else ""
    size = "tiny models" if args.tiny else "full size"
    return [f"bench_gpu: {name}, torch {torch.__version__}, {cuda}{size}",
            f"MFU peak: {peak_note}; cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
            f"{torch.backends.cuda.matmul.allow_tf32}; budget {args.budget:.0f} s",
            f"sampling: {spec.steps} Euler steps, CFG 4 (renorm 1), captions {spec.cap_len} + 1 "
            f"tokens, {str(spec.dtype)[6:]}" + (f"; sides {spec.sides} px" if args.tiny else "")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget", type=float, default=260, help="seconds the rows may take")
    p.add_argument("--grace", type=float, default=20,
                   help="seconds past the budget before the watchdog stops the run")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the MFU's peak (default: runs.PEAK_TFLOPS for the device)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the compiled rows")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; aot_eager with --tiny)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--compile-dynamic", choices=["true", "false"], default=None,
                   help="torch.compile dynamic= (default: automatic, dynamic after a shape "
                        "change)")
    args = p.parse_args(argv)
    if args.tiny and args.compile_backend is None:
        args.compile_backend = "eager"    # dynamo's capture only: inductor takes minutes on a CPU
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA device (use --tiny for the CPU smoke test)")
    spec = make_spec(args.tiny, device)
    if args.tiny:
        torch.set_num_threads(1)
        peak, peak_note = (args.peak_tflops or 1.0) * 1e12, "nominal (CPU)"
    else:
        peak = peak_flops(device, args.peak_tflops)
        peak_note = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown: MFU left out"
    header = header_lines(spec, peak_note, args)
    print("\n".join(header), flush=True)
    table = Table(args.json, header)
    start_watchdog(table, args.budget + args.grace)
    run_rows(table, spec, Budget(args.budget), peak, args)
    print("\n".join(header))
    print(table.render(), flush=True)


if __name__ == "__main__":
    main()
