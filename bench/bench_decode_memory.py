"""Peak memory and time of one full-size autoencoder-P decode on CPU (default: 1024x1024, i.e. a 64x64 latent, fp32).

    python bench/bench_decode_memory.py [--size 1024] [--dtype fp32|bf16] [--threads N]

The decoder is written to a temporary Lightning-style file (random weights) and opened with load_decoder, so the
figure includes the real loading path (mmap'd, no second copy). Memory is the process's anonymous resident memory
(RssAnon: heap, activations; excludes the mmap'd weight file's page cache), polled every 5 ms from /proc/self/status,
plus ru_maxrss (all resident pages, peak). Target: < 8 GB at 1024x1024 fp32.
"""

import argparse
import os
import resource
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from decoder import Decoder, DecoderConfig  # noqa: E402
from plumbing.loading import load_decoder


def rss_anon_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakPoller:
    def __init__(self, interval=0.005):
        self.interval, self.peak, self._stop = interval, rss_anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="square image side in pixels (multiple of 16)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.size % 16:
        sys.exit(f"--size {args.size} is not a multiple of 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    GB = 1024 ** 3

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ae.ckpt")
        torch.manual_seed(0)
        src = Decoder(DecoderConfig.autoencoder_p())
        torch.save({"state_dict": {f"decoder.{k}": v for k, v in src.state_dict().items()}}, path)
        del src
        base = rss_anon_bytes()
        t0 = time.perf_counter()
        dec = load_decoder(path, dtype=dtype)
        t_load = time.perf_counter() - t0
        after_load = rss_anon_bytes()
        n_params = sum(p.numel() for p in dec.parameters())

        h = args.size // 16
        z = torch.randn(1, 384, h, h, dtype=dtype)
        with torch.inference_mode(), PeakPoller() as poll:
            t0 = time.perf_counter()
            img = dec(z)
            t_dec = time.perf_counter() - t0
        assert img.shape == (1, 3, args.size, args.size) and torch.isfinite(img).all()

    print(f"decoder-P {n_params:,} params, {args.dtype}, {torch.get_num_threads()} threads, "
          f"latent [1, 384, {h}, {h}] -> image [1, 3, {args.size}, {args.size}]")
    print(f"load: {t_load:.2f} s, RssAnon +{(after_load - base) / GB:.3f} GB (weights mmap'd from the file)")
    print(f"decode: {t_dec:.1f} s, peak RssAnon {poll.peak / GB:.2f} GB "
          f"(+{(poll.peak - after_load) / GB:.2f} GB over the loaded model), "
          f"peak RSS (ru_maxrss) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")
    print(f"target < 8 GB: {'OK' if resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 8 * GB else 'EXCEEDED'}")


if __name__ == "__main__":
    main()
