"""
The optional feature cache of train.py --cache DIR: the DINOv3 latents and Gemma features of every
record, computed once (the ranks share the work) and then read instead of the images.

You need not read this to learn SVG-T2I.
"""

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from data import caption_texts, load_bucket_crop
from plumbing.files import atomic_write, describe


class Cache:
    """DIR/meta.json (what the features depend on), DIR/empty.safetensors (the dropped caption),
    DIR/{i // 10000:05d}/{i:09d}.safetensors per record: "latent" [C, h, w] raw fp32 DINOv3
    features and "text.{language}.{length}" [n_tokens, D] Gemma features of every caption variant
    (valid tokens only; padding is re-added per batch, which changes nothing: Gemma is causal and
    NextDiT masks padded keys). An unreadable image gets a DIR/.../{i:09d}.bad file instead, and is
    skipped like an unreadable image. Filling is shared out by the caller
    (each rank fills its own records); then one process calls finish()."""

    def __init__(self, folder, meta):
        """`meta`: what the features depend on. An existing cache built for other
        settings is refused."""
        self.folder, self.meta, self.empty = Path(folder), dict(meta), None
        if (self.folder / "meta.json").is_file():
            old = json.loads((self.folder / "meta.json").read_text())
            diff = [k for k in meta if old.get(k) != meta[k]]
            if diff:
                raise ValueError(f"--cache {folder} was built for other settings "
                                 f"({', '.join(diff)} differ): use another cache folder")
            self.meta = old

    @staticmethod
    def text_key(choice):
        return f"text.{choice[0]}.{choice[1]}"

    def file(self, i, suffix=".safetensors"):
        return self.folder / f"{i // 10000:05d}" / f"{i:09d}{suffix}"

    def missing(self, indices):
        return [i for i in indices if not (self.file(i).exists() or self.file(i, ".bad").exists())]

    def read(self, i):
        if self.file(i, ".bad").exists():
            raise ValueError(self.file(i, ".bad").read_text().strip())
        return load_file(str(self.file(i)))

    def write_empty(self, encode_texts, max_text_len):
        """The features of the dropped caption, "" (one process writes it)."""
        if not (self.folder / "empty.safetensors").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            feats, mask = encode_texts([""], max_text_len)
            empty = {"text": feats[0, :int(mask[0].sum())].cpu().contiguous()}
            atomic_write(self.folder / "empty.safetensors", lambda tmp: save_file(empty, str(tmp)))

    def fill(self, indices, records, crops, encode_images, encode_texts, max_text_len):
        """Encode and write records[indices]; an unreadable image gets its .bad file."""
        images, texts, good = [], [], []
        for i in indices:
            self.file(i).parent.mkdir(parents=True, exist_ok=True)
            try:
                record = records[i]
                images.append(load_bucket_crop(record["path"], crops))
            except Exception as e:
                reason = describe(e)
                atomic_write(self.file(i, ".bad"), lambda tmp: tmp.write_text(reason))
                continue
            texts.append([(self.text_key(c), t) for c, t in caption_texts(record)])
            good.append(i)
        if not good:
            return
        latents = encode_images(images)
        feats, mask = encode_texts([t for per in texts for _, t in per], max_text_len)
        lens = mask.sum(1).tolist()
        k = 0
        for i, latent, per in zip(good, latents, texts):
            tensors = {"latent": latent.cpu().contiguous()}
            for key, _ in per:
                tensors[key] = feats[k, :lens[k]].cpu().contiguous()
                k += 1
            atomic_write(self.file(i), lambda tmp: save_file(tensors, str(tmp)))

    def finish(self, n_records):
        """Record the feature widths (so a model can be built without loading the encoders)
        in meta.json."""
        for i in range(n_records):
            if self.file(i).exists():
                d = load_file(str(self.file(i)))
                self.meta["latent_channels"] = d["latent"].shape[0]
                text = next(v for k, v in d.items() if k.startswith("text."))
                self.meta["text_dim"] = text.shape[1]
                break
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.meta, indent=1)
        atomic_write(self.folder / "meta.json", lambda tmp: tmp.write_text(text))

    def load(self):
        """After filling: the finished meta.json and the dropped caption's features."""
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.empty = load_file(str(self.folder / "empty.safetensors"))["text"]
        return self
