"""
Benchmark: load the whole SVG-T2I pipeline from full-size checkpoints in the official formats, then time sampling.

    python bench/bench_pipeline.py TMPDIR [--resolutions 256 512 1024] [--steps 2] [--dtype bf16] [--keep]

1. Writes random full-size weights in the official layouts into TMPDIR (about 21 GB of disk):
   pre-trained/dit-2b/consolidated.00-of-01.pth (fp32, 2.61B), pre-trained/autoencoder/svg_autoencoder-P-stage3.ckpt
   (Lightning: encoder.* DINOv3 ViT-S/16+ and decoder.*), the stats file, and a Gemma-2-2B folder (fp32 safetensors
   shards + index + a small sentencepiece tokenizer.model). Writing is memory-light (the DiT through file-backed
   tensors, Gemma one shard at a time).
2. In a fresh child process: SVGT2I.from_pretrained(..., dtype) while polling the child's RssAnon (anonymous
   memory; the mmap'd checkpoint pages are reclaimable cache and do not count) and its wall time; then one image per
   resolution with --steps Euler steps and CFG (a batch of 2 per forward), timing each step.
3. Deletes the checkpoints (unless --keep).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nextdit_load import PeakPoller, write_checkpoint  # noqa: E402

GB = 1e9


def write_autoencoder(path, seed=0):
    from decoder import Decoder, DecoderConfig
    from dinov3 import DINOv3, DINOv3Config, dinov3_official_state_dict
    torch.manual_seed(seed)
    sd = {"encoder." + k: v for k, v in dinov3_official_state_dict(DINOv3(DINOv3Config.vits16plus())).items()}
    sd.update({"decoder." + k: v for k, v in Decoder(DecoderConfig.autoencoder_p()).state_dict().items()})
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.6.0", "state_dict": sd}, path)


def write_gemma(folder, seed=0, shard_bytes=4e9):
    """Gemma-2-2B in the Hub layout: config.json, model-0000k-of-0000n.safetensors (fp32), the index."""
    from safetensors.torch import save_file
    from gemma2 import Gemma2, Gemma2Config
    from plumbing.tiny import gemma2_hub_config, train_tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    cfg = Gemma2Config.gemma2_2b()
    with torch.device("meta"):
        model = Gemma2(cfg)
    shapes = [("model." + k, v.shape) for k, v in model.state_dict().items()]
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        n = shape.numel() * 4
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.empty(shape).normal_(0, 0.02, generator=g) for name, shape in shard}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # config.json (Hub spelling) and a small tokenizer: its ids stay far below the 256k vocabulary
    (folder / "config.json").write_text(json.dumps(gemma2_hub_config(cfg), indent=2))
    tok = train_tokenizer(["a photo of a cat on a sofa", "two red apples on a wooden table at sunset"] * 50,
                          str(folder / "tokenizer"), vocab_size=300)
    os.replace(tok, folder / "tokenizer.model")


def child(pre, gemma, dtype, resolutions, steps, threads):
    """Runs in a fresh process: load, then sample; prints one JSON line of results."""
    if threads:
        torch.set_num_threads(threads)
    from svgt2i import SVGT2I
    poll = PeakPoller(interval=0.01)
    poll.start()
    t0 = time.time()
    pipe = SVGT2I.from_pretrained(pre, gemma, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    load_s = time.time() - t0
    load_peak = poll.peak
    res = {"load_s": load_s, "load_peak_rss_anon_gb": load_peak / GB, "sampling": {}}
    print(json.dumps(res), flush=True)
    for r in resolutions:
        stamps = []
        pipe.generate("a photo of a cat on a sofa", height=r, width=r, steps=steps, seed=0,
                      progress=lambda idx, i, N: stamps.append(time.time()))
        per_step = [b - a for a, b in zip(stamps, stamps[1:])] or [float("nan")]
        res["sampling"][r] = {"s_per_step": min(per_step), "peak_rss_anon_gb": poll.peak / GB}
        print(json.dumps(res), flush=True)
    poll.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tmpdir")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--steps", type=int, default=2, help="sampling steps per resolution (the fastest is reported)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--write-only", action="store_true", help="only write the checkpoints (implies --keep)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.dtype, a.resolutions, a.steps, a.threads)
    tmp = Path(a.tmpdir)
    pre, gemma = tmp / "pre-trained", tmp / "gemma-2-2b"
    if not (pre / "dit-2b" / "consolidated.00-of-01.pth").is_file():
        t0 = time.time()
        (pre / "autoencoder").mkdir(parents=True, exist_ok=True)
        write_checkpoint(pre / "dit-2b")
        write_autoencoder(pre / "autoencoder" / "svg_autoencoder-P-stage3.ckpt")
        torch.save({"mean": torch.randn(12, 384) * 0.05, "std": torch.rand(12, 384) + 0.2},
                   pre / "dinov3_s16p_layer_patchtoken_stats_dist.pt")
        write_gemma(gemma)
        print(f"wrote full-size checkpoints to {tmp} in {time.time() - t0:.0f}s", flush=True)
    if a.write_only:
        return
    cmd = [sys.executable, __file__, a.tmpdir, "--child", str(pre), str(gemma), "--dtype", a.dtype,
           "--steps", str(a.steps), "--threads", str(a.threads), "--resolutions", *map(str, a.resolutions)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(out.stderr, file=sys.stderr)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    from gemma2 import Gemma2, Gemma2Config
    from nextdit import NextDiT, NextDiTConfig
    with torch.device("meta"):
        bf16_bytes = 2 * sum(p.numel() for m in (NextDiT(NextDiTConfig.from_name("2b")), Gemma2(Gemma2Config.gemma2_2b()))
                             for p in m.parameters())
    if res:
        print(f"load ({a.dtype}): {res['load_s']:.1f}s, peak RssAnon {res['load_peak_rss_anon_gb']:.2f} GB "
              f"({res['load_peak_rss_anon_gb'] * GB / bf16_bytes:.2f}x the DiT + Gemma bf16 weight bytes)")
        for r, v in res["sampling"].items():
            print(f"{r}x{r}: {v['s_per_step']:.1f} s per step (CFG batch of 2), peak RssAnon {v['peak_rss_anon_gb']:.2f} GB")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {a.threads or torch.get_num_threads()}")
    if not a.keep:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
