"""
Benchmark: load a full-size official NextDiT checkpoint (fp32 consolidated.00-of-01.pth, ~10.4 GB) into bf16.

    python bench/bench_nextdit_load.py TMPDIR [--keep] [--no-warm]

1. Writes a random 2B checkpoint in the official format (flat fp32 state dict, official key order, torch.save)
   into TMPDIR. Writing is memory-light: each tensor is a MAP_SHARED mapping of its own scratch file
   (torch.from_file), filled in place, so its pages are reclaimable file cache, not anonymous memory; torch.save
   writes each storage straight from its pages. Needs ~21 GB of disk for a moment (scratch + checkpoint).
2. Evicts the checkpoint from the page cache (fsync + POSIX_FADV_DONTNEED on this one file) and loads it with
   load_nextdit(..., dtype=torch.bfloat16) in a fresh child process, polling the child's RssAnon from
   /proc/<pid>/status every millisecond. Then loads it again with a warm cache (unless --no-warm).
3. Deletes TMPDIR's checkpoint (unless --keep).

Target (issue 4): peak RssAnon < 1.3x the bf16 weight bytes (2 * 2,611,246,336 B = 5.22 GB). Pages of an mmap'd
file are reclaimable cache and do not count.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nextdit import NextDiT, NextDiTConfig  # noqa: E402
from plumbing.loading import load_nextdit

CONSOLIDATED = "consolidated.00-of-01.pth"
GB = 1e9


def rss_anon(pid="self"):
    """RssAnon of a process in bytes (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None


class PeakPoller(threading.Thread):
    """Polls a process's RssAnon until stopped; keeps the peak."""

    def __init__(self, pid="self", interval=0.001):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._stop_event = pid, interval, 0, threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            value = rss_anon(self.pid)
            if value is None:
                break
            self.peak = max(self.peak, value)
            time.sleep(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()
        return self.peak


def write_checkpoint(folder, seed=0):
    with torch.device("meta"):
        shapes = [(k, v.shape) for k, v in NextDiT(NextDiTConfig.from_name("2b")).state_dict().items()]
    scratch = folder / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for i, (name, shape) in enumerate(shapes):
        t = torch.from_file(str(scratch / f"{i}.bin"), shared=True, size=shape.numel(), dtype=torch.float32)
        t.normal_(0.0, 0.02, generator=g)  # in place, into the file's page cache
        sd[name] = t.view(shape)
    torch.save(sd, folder / CONSOLIDATED)
    del sd, t
    shutil.rmtree(scratch)
    return folder / CONSOLIDATED


def evict_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(path):
    """Runs in a fresh process: load, time, sanity-check, report JSON on stdout."""
    base = rss_anon()
    t0 = time.perf_counter()
    model = load_nextdit(path, device="cpu", dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    params = list(model.parameters())
    ok = all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    after = rss_anon()
    # spot-check values against the file (read lazily through mmap)
    sd = torch.load(path, mmap=True, weights_only=True)
    for key in ("x_embedder.weight", "layers.25.feed_forward.w2.weight", "final_layer.linear.bias"):
        ok &= torch.equal(model.state_dict()[key], sd[key].to(torch.bfloat16))
    print(json.dumps({"seconds": seconds, "baseline_rss_anon": base, "after_rss_anon": after,
                      "params": sum(p.numel() for p in params), "ok": bool(ok)}), flush=True)


def measure(path):
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(path)], stdout=subprocess.PIPE, text=True)
    poller = PeakPoller(proc.pid)
    poller.start()
    out, _ = proc.communicate()
    peak = poller.stop()
    if proc.returncode != 0:
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_anon"] = peak
    return result


def report(label, r, bf16_bytes):
    peak, base = r["peak_rss_anon"], r["baseline_rss_anon"]
    print(f"{label}: load {r['seconds']:.1f} s | peak RssAnon {peak / GB:.2f} GB = {peak / bf16_bytes:.3f}x bf16 "
          f"weights (baseline after imports {base / GB:.2f} GB; above baseline {(peak - base) / bf16_bytes:.3f}x) | "
          f"params {r['params']:,} | values ok {r['ok']}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tmpdir", type=Path, nargs="?", help="scratch folder on a disk (not tmpfs) with ~21 GB free")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--no-warm", action="store_true", help="skip the second, warm-cache load")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.tmpdir is None:
        parser.error("tmpdir is required")

    folder = args.tmpdir / "nextdit_bench"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        poller = PeakPoller()
        poller.start()
        t0 = time.perf_counter()
        path = write_checkpoint(folder)
        writer_peak = poller.stop()
        print(f"wrote {path} ({path.stat().st_size / GB:.2f} GB, fp32) in {time.perf_counter() - t0:.0f} s; "
              f"writer peak RssAnon {writer_peak / GB:.2f} GB", flush=True)
        bf16_bytes = 2 * 2_611_246_336
        print(f"bf16 weight bytes: {bf16_bytes / GB:.3f} GB; target peak < {1.3 * bf16_bytes / GB:.2f} GB", flush=True)
        evict_from_page_cache(path)
        cold = measure(path)
        report("cold cache", cold, bf16_bytes)
        if not args.no_warm:
            report("warm cache", measure(path), bf16_bytes)
        print("PASS" if cold["peak_rss_anon"] < 1.3 * bf16_bytes and cold["ok"] else "FAIL", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
