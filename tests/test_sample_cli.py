"""sample.py as a new user meets it: every mistake is one line and exit 2 before any weights load, output
locations are checked first, prompt files of every kind are read, runs stream to disk and a rerun completes an
interrupted one, the benchmark layouts (GenEval, DPG-Bench) and index ranges, progress lines in logs, --help."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from plumbing import UsageError, jobs, loading, runs
import sample
import svgt2i
from test_sample import release  # noqa: F401 (fixture: a tiny release in the official layout)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any weights fails the test: the errors below must come first."""
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")
    monkeypatch.setattr(svgt2i.SVGT2I, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(loading, "load_autoencoder", refuse)


def error_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("sample.py: error:"), err
    return err[0]


BAD = [
    (["--h", "0"], "--h 0: image sides must be positive"),
    (["--w", "0", "--h", "32"], "--w 0: image sides must be positive"),
    (["--h", "30"], "--h 30 is not a multiple of 16"),
    (["--n", "0"], "--n 0: must be at least 1"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--cfg", "nan"], "--cfg nan: must be a finite number"),
    (["--cfg", "inf"], "--cfg inf: must be a finite number"),
    (["--shift", "0"], "--shift 0.0: must be positive"),
    (["--shift", "-1"], "--shift -1.0: must be positive"),
    (["--renorm", "-1"], "--renorm -1.0: must be >= 0"),
    (["--seed", "-3"], "--seed -3"),
    (["--system-prompt", "bsae"], "--system-prompt 'bsae': not one of base, align"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU"),
    (["--device", "mps"], "--device mps"),
    (["--device", "meta"], "--device meta: meta devices are not supported"),
    (["--h", "160000"], "the DiT's positions cover at most 8176x8176 px"),
    (["--h", "32", "--w", "9008"], "the DiT's positions cover at most"),
    (["--start", "5", "--end", "3"], "need 0 <= start < end"),
    (["--start", "9"], "there are only 1 prompt(s)"),
    (["--out", "noext"], "--out noext: give a file name ending in .png"),
    (["--out", "/dev/full"], "give a file name ending in .png"),
    (["--outdir", "afile/sub"], "--outdir afile/sub: cannot write there"),
    (["--outdir", "/proc/self/nope"], "--outdir /proc/self/nope: cannot write there"),
    (["--layout", "dpg"], "--layout dpg needs a .jsonl --prompts file"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_mistakes_are_one_line_before_any_loading(release, tmp_path, monkeypatch, capsys, no_loading, extra,
                                                  message):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    err = error_line(["--ckpt", release["ckpt"], "--gemma", release["gemma"], "--prompt", "x", *extra], capsys)
    assert message in err, err


def test_an_existing_folder_as_out_and_a_literal_system_prompt(release, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.png").mkdir()
    err = error_line(["--ckpt", release["ckpt"], "--gemma", release["gemma"], "--prompt", "x", "--out", "d.png"],
                     capsys)
    assert "for a folder, use --outdir" in err
    sample.main(["--ckpt", release["ckpt"], "--gemma", release["gemma"], "--prompt", "x", "--h", "32", "--steps",
                 "1", "--system-prompt", "text:Draw this: ", "--out", "a.png"])
    assert Image.open("a.png").text["system_prompt"] == "Draw this: "


# ---------------------------------------------------------------------------------------------------------------
# Prompt files

def test_prompt_files_of_every_kind(tmp_path, capsys):
    (tmp_path / "P.JSONL").write_text('{"prompt": "a cat"}\n{"caption": "a dog"}\n')
    assert jobs.read_prompts(str(tmp_path / "P.JSONL"))[0] == ["a cat", "a dog"]
    (tmp_path / "p.json").write_text(json.dumps(["one", {"text": "two"}]))
    assert jobs.read_prompts(str(tmp_path / "p.json"))[0] == ["one", "two"]
    (tmp_path / "bom.txt").write_bytes("\ufeffa red cube\nblue\n".encode("utf-8"))
    assert jobs.read_prompts(str(tmp_path / "bom.txt"))[0] == ["a red cube", "blue"]
    (tmp_path / "latin1.txt").write_bytes("fine\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.txt:2:4: not UTF-8 text \(byte 0xe9\)"):
        jobs.read_prompts(str(tmp_path / "latin1.txt"))


def test_damaged_files_are_named(release, tmp_path, capsys):
    pre = tmp_path / "pre-trained"
    shutil.copytree(release["ckpt"], pre)
    stats = pre / "dinov3_s16p_layer_patchtoken_stats_dist.pt"
    stats.write_bytes(b"\x00" * 64)
    argv = ["--ckpt", str(pre), "--gemma", release["gemma"], "--prompt", "x", "--h", "32", "--out",
            str(tmp_path / "a.png")]
    err = error_line(argv, capsys)
    assert f"{stats}: cannot read checkpoint: not a torch checkpoint, or corrupt or truncated" in err
    shutil.copyfile(Path(release["ckpt"]) / stats.name, stats)
    ae = pre / "autoencoder" / "svg_autoencoder-P-stage3.ckpt"
    ae.write_bytes(os.urandom(500))
    assert f"{ae}: cannot read checkpoint: not a torch checkpoint" in error_line(argv, capsys)


def test_the_ema_dit_is_preferred_and_named(release, tmp_path, capsys):
    pre = tmp_path / "pre-trained"
    shutil.copytree(release["ckpt"], pre)
    dit = next(pre.glob("dit-*"))
    shutil.copyfile(dit / "consolidated.00-of-01.pth", dit / "consolidated_ema.00-of-01.pth")
    sample.main(["--ckpt", str(pre), "--gemma", release["gemma"], "--prompt", "x", "--h", "32", "--steps", "1",
                 "--out", str(tmp_path / "a.png")])
    assert f"loaded {dit / 'consolidated_ema.00-of-01.pth'}" in capsys.readouterr().err


def test_the_release_beside_the_command_needs_no_flags(release, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = error_line(["--prompt", "x"], capsys)
    assert "no checkpoint: pass --ckpt FOLDER" in err and "looked in ./pre-trained" in err
    shutil.copytree(release["ckpt"], tmp_path / "pre-trained")
    shutil.copytree(release["gemma"], tmp_path / "gemma-2-2b")
    sample.main(["--prompt", "a red cube", "--h", "32", "--steps", "1", "--out", "a.png"])
    assert Image.open("a.png").size == (32, 32) and Image.open("a.png").text["ckpt"] == "pre-trained"


# ---------------------------------------------------------------------------------------------------------------
# Streaming, resuming, layouts

def test_an_interrupted_run_is_completed_by_the_same_command(release, tmp_path, monkeypatch, capsys):
    base = ["--ckpt", release["ckpt"], "--gemma", release["gemma"], "--prompt", "a red cube", "--prompt",
            "a blue ball", "--n", "2", "--h", "32", "--steps", "2", "--seed", "3"]
    sample.main(base + ["--outdir", str(tmp_path / "whole")])
    saves, real = [], jobs.save_png

    def dies_after_three(image, path, meta):           # Ctrl-C while the fourth image is written
        if len(saves) == 3:
            raise KeyboardInterrupt
        saves.append(path)
        real(image, path, meta)
    monkeypatch.setattr(jobs, "save_png", dies_after_three)
    with pytest.raises(SystemExit) as e:
        sample.main(base + ["--outdir", str(tmp_path / "cut")])
    assert e.value.code == 130 and "the same command draws the rest" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "cut")) == ["00000.png", "00001.png", "00002.png"]   # no partial file
    monkeypatch.setattr(jobs, "save_png", real)
    sample.main(base + ["--outdir", str(tmp_path / "cut")])
    assert "3 of 4 images already drawn: skipped" in capsys.readouterr().err
    for name in os.listdir(tmp_path / "whole"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
    # a rerun with other settings must not mix runs; --overwrite redoes the images
    err = error_line(base[:-1] + ["4", "--outdir", str(tmp_path / "cut")], capsys)
    assert "was made with other settings (seed '3', this run '4')" in err
    sample.main(base[:-1] + ["4", "--outdir", str(tmp_path / "cut"), "--overwrite"])
    assert Image.open(tmp_path / "cut" / "00000.png").text["seed"] == "4"


def test_dpg_layout_and_index_range(release, tmp_path):
    records = [{"filename": f"p{i}.txt", "prompt": p} for i, p in enumerate(["a red cube", "two dogs", "a cat"])]
    (tmp_path / "dpg.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "dpg"
    sample.main(["--ckpt", release["ckpt"], "--gemma", release["gemma"], "--prompts", str(tmp_path / "dpg.jsonl"),
                 "--layout", "dpg", "--outdir", str(out), "--h", "32", "--w", "48", "--steps", "1",
                 "--start", "1", "--end", "3", "--batch-size", "3"])
    assert sorted(os.listdir(out)) == ["00001", "00002", "grid_output"]             # prompts 1 and 2 only
    assert sorted(os.listdir(out / "grid_output")) == ["p1.png", "p2.png"]
    assert json.loads((out / "00002" / "metadata.jsonl").read_text()) == records[2]
    # the official per-image seeds: seed + index * n + k
    assert Image.open(out / "00002" / "samples" / "00003.png").text["seed"] == str(42 + 2 * 4 + 3)
    # the 2x2 grid with the official 2-px black border (torchvision make_grid's layout)
    grid = Image.open(out / "grid_output" / "p1.png").convert("RGB")
    assert grid.size == (2 * 48 + 3 * 2, 2 * 32 + 3 * 2)
    for k in range(4):
        im = Image.open(out / "00001" / "samples" / f"{k:05d}.png").convert("RGB")
        x, y = 2 + (k % 2) * (48 + 2), 2 + (k // 2) * (32 + 2)
        assert list(grid.crop((x, y, x + 48, y + 32)).getdata()) == list(im.getdata()), k
    border = [grid.getpixel((x, y)) for x in range(grid.width) for y in (0, 1, 34, 35, grid.height - 1)]
    assert set(border) == {(0, 0, 0)}


def test_progress_is_plain_lines_in_a_log_and_one_line_on_a_terminal():
    log = io.StringIO()
    p = runs.Progress("images", 40, stream=log)
    for k in range(41):
        p(k, " | step 1/2")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 15 <= len(lines) <= 25
    assert lines[-1].startswith("images 40/40 (100%) | step 1/2 |") and "eta" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    p = runs.Progress("images", 3, stream=tty)
    for k in range(4):
        p(k)
    assert tty.getvalue().count("\r") == 4 and tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# --help

def test_help_is_instant_and_says_each_default_once():
    code = ("import sys, sample\ntry:\n    sample.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert r.returncode == 0 and "torch imported: False" in r.stdout, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert "(default: None)" not in text
    assert "--toy the bundled toy model (assets/toy), with its own sampler defaults: 25 steps, cfg 4.0, " \
           "shift 2.0, euler, empty system prompt" in text
    # the help's numbers are svgt2i.Sampling's
    s = svgt2i.Sampling()
    for flag, value in (("--steps", s.steps), ("--cfg", s.cfg), ("--shift", s.shift), ("--renorm", s.renorm),
                        ("--cfg-trunc", s.cfg_trunc), ("--solver", s.solver), ("--system-prompt", s.system_prompt)):
        section = text.split("what to draw:", 1)[1].split(flag + " ", 1)[1][:300]    # past the usage
        assert f"default {value}" in section, (flag, section)
    assert jobs.SYSTEM_PROMPT_NAMES == tuple(svgt2i.SYSTEM_PROMPTS)


def test_tokenizers_record_no_path(tmp_path):
    from plumbing.tiny import train_tokenizer
    model = train_tokenizer(["two red circles on the left"] * 20, str(tmp_path / "tok"), vocab_size=300)
    assert str(tmp_path).encode() not in Path(model).read_bytes() and not (tmp_path / "tok.vocab").exists()
    bundled = (ROOT / "assets" / "toy" / "text_encoder" / "tokenizer.model").read_bytes()
    assert b"/tokenizer" not in bundled and b"/work" not in bundled and b"/home" not in bundled
