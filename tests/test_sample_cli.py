"""sample.py as a new user meets it: every mistake is one line and exit 2 before any weights load, output
locations are checked first, prompt files of every kind are read, runs stream to disk and a rerun completes an
interrupted one, the benchmark layouts (GenEval, DPG-Bench) and index ranges, progress lines in logs, --help."""

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from plumbing import UsageError, files, jobs, loading, runs
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
    # sizes no machine runs, refused before anything is built (issue #23)
    (["--n", "1000000000"], "--n 1000000000: at most 1,000,000 (images in one run)"),
    (["--prompt", "y", "--n", "600000"], "1,200,000 images in one run (prompts 0 to 1, 600000 each): at most "
     "1,000,000; split it with --start/--end"),
    (["--steps", "1000000000"], "--steps 1000000000: at most 10,000"),
    (["--batch-size", "1000000000"], "--batch-size 1000000000: at most 4,096"),
    (["--score", "1000000000"], "--score 1000000000: at most 1,800"),
    (["--score", "0"], "--score 0: must be at least 1"),
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
    # no partial file (.sample.lock: the run lock, see test_overlapping_runs_are_refused)
    assert sorted(os.listdir(tmp_path / "cut")) == [".sample.lock", "00000.png", "00001.png", "00002.png"]
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
    assert sorted(os.listdir(out)) == [".sample.lock", "00001", "00002", "grid_output"]   # prompts 1 and 2 only
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
# Output folders a run shares with others and with what a user made (issue #23)

def tiny(release, *extra):
    return ["--ckpt", release["ckpt"], "--gemma", release["gemma"], "--h", "32", "--steps", "1", *extra]


def write_dpg(path, filenames):
    path.write_text("".join(json.dumps({"prompt": f"prompt {k}", "filename": f}) + "\n"
                            for k, f in enumerate(filenames)))
    return str(path)


LINKS = [   # (the run's output flags, the path a link is planted at)
    (["--layout", "geneval", "--outdir", "out"], "out/00000"),
    (["--layout", "geneval", "--outdir", "out"], "out/00000/samples"),
    (["--layout", "geneval", "--outdir", "out"], "out/00000/metadata.jsonl"),
    (["--layout", "dpg", "--outdir", "out"], "out/grid_output"),
    (["--outdir", "out"], "out/00000.png"),
    (["--out", "a.png"], "a.png"),
    (["--out", "sub/a.png", "--n", "2"], "sub/a_00001.png"),
]


@pytest.mark.parametrize("flags, link", LINKS, ids=[link for _, link in LINKS])
def test_links_planted_in_an_output_folder_are_refused(release, tmp_path, monkeypatch, capsys, no_loading, flags,
                                                       link):
    monkeypatch.chdir(tmp_path)
    prompts = write_dpg(tmp_path / "p.jsonl", ["p0.txt"])
    (tmp_path / "elsewhere").mkdir()
    Path(link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path / "elsewhere", link)
    err = error_line(tiny(release, "--prompts", prompts, *flags), capsys)
    assert f"{link} is a symbolic link (to {tmp_path / 'elsewhere'})" in err, err
    assert os.listdir(tmp_path / "elsewhere") == []


def test_the_outdir_itself_may_be_a_link(release, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scratch").mkdir()
    os.symlink(tmp_path / "scratch", "out")        # the user named it: a cluster's scratch space
    sample.main(tiny(release, "--prompt", "x", "--outdir", "out"))
    assert (tmp_path / "scratch" / "00000.png").is_file()


DPG_RECORDS = [   # (the dpg.jsonl's lines, the error)
    ('{"prompt": "a", "filename": 5}\n', 'p.jsonl:1: --layout dpg needs a "filename" naming the prompt\'s grid '
     "(as DPG-Bench's dpg.jsonl has), got 5"),
    ('{"prompt": "a", "filename": "a.txt"}\n\n{"prompt": "b", "filename": null}\n', "p.jsonl:3: --layout dpg "
     'needs a "filename"', ),
    ('{"prompt": "a", "filename": "a.txt"}\n{"prompt": "b"}\n', 'p.jsonl:2: --layout dpg needs a "filename"'),
    ('{"prompt": "a", "filename": ""}\n', 'p.jsonl:1: --layout dpg needs a "filename"'),
    ('{"prompt": "a", "filename": "x/a.txt"}\n{"prompt": "b", "filename": "a.png"}\n', "p.jsonl:2: \"filename\" "
     "'a.png' names the same grid (grid_output/a.png) as p.jsonl:1"),
]


@pytest.mark.parametrize("lines, message", DPG_RECORDS, ids=range(len(DPG_RECORDS)))
def test_dpg_records_are_checked_before_anything_is_drawn(release, tmp_path, monkeypatch, capsys, no_loading,
                                                          lines, message):
    monkeypatch.chdir(tmp_path)
    Path("p.jsonl").write_text(lines)
    err = error_line(tiny(release, "--prompts", "p.jsonl", "--layout", "dpg", "--outdir", "out"), capsys)
    assert message in err, err
    assert not Path("out").exists() or os.listdir("out") == []


def jpeg(path):
    Image.new("RGB", (8, 8), "red").save(path, format="JPEG")


def plain_png(path):
    Image.new("RGB", (8, 8), "red").save(path, format="PNG")


def truncated_png(path):
    """The first half of a sample's PNG (a copy cut short): whether it was ours cannot be read."""
    info = PngInfo()
    info.add_text("seed", "42")
    Image.effect_noise((64, 64), 50).save(path, format="PNG", pnginfo=info)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


NOT_OURS = [    # (what is at the output path, how it is made, the error's reason)
    ("jpeg", jpeg, "(a JPEG image)"),
    ("text", lambda p: p.write_text("my notes\n"), "(not an image)"),
    ("png without our metadata", plain_png, "(a PNG without sample.py's settings in it)"),
    ("truncated png", truncated_png, "(a truncated or damaged image)"),
]


@pytest.mark.parametrize("where", ["--out", "--outdir", "--reconstruct"])
@pytest.mark.parametrize("kind, make, reason", NOT_OURS, ids=[k for k, _, _ in NOT_OURS])
def test_a_file_sample_did_not_draw_is_kept(release, tmp_path, monkeypatch, capsys, no_loading, where, kind, make,
                                            reason):
    monkeypatch.chdir(tmp_path)
    plain_png(tmp_path / "in.png")
    path = {"--out": tmp_path / "photo.png", "--outdir": tmp_path / "out" / "00000.png",
            "--reconstruct": tmp_path / "photo.png"}[where]
    path.parent.mkdir(exist_ok=True)
    make(path)
    before = path.read_bytes()
    flags = {"--out": ["--prompt", "x", "--out", "photo.png"], "--outdir": ["--prompt", "x", "--outdir", "out"],
             "--reconstruct": ["--reconstruct", "in.png", "--out", "photo.png"]}[where]
    err = error_line(tiny(release, *flags), capsys)
    assert "photo.png" in err or "00000.png" in err
    assert "is not an image sample.py drew " + reason in err and "pass --overwrite to replace it" in err, err
    assert path.read_bytes() == before


def test_overwrite_replaces_a_file_but_never_a_folder(release, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("notes.png").write_text("my notes\n")
    sample.main(tiny(release, "--prompt", "x", "--out", "notes.png", "--overwrite"))
    assert Image.open("notes.png").text["seed"] == "42"
    capsys.readouterr()
    (tmp_path / "out" / "00000.png").mkdir(parents=True)
    (tmp_path / "out" / "00000.png" / "keep.txt").write_text("mine")
    err = error_line(tiny(release, "--prompt", "x", "--outdir", "out", "--overwrite"), capsys)
    assert "--outdir out: out/00000.png exists and is not a regular file" in err
    assert (tmp_path / "out" / "00000.png" / "keep.txt").read_text() == "mine"


def full_disk(self, fp, *a, **k):
    """A writer (the PNG's or the text's) that fills its file halfway and finds the disk full."""
    Path(fp).write_bytes(b"\x89PNG half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target, name, failing", [
    (Image.Image, "save", "out/00000/samples/00000.png"),
    (Path, "write_text", "out/00000/metadata.jsonl"),
])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(release, tmp_path, monkeypatch, capsys, target,
                                                              name, failing):
    monkeypatch.chdir(tmp_path)
    prompts = write_dpg(tmp_path / "p.jsonl", ["p0.txt"])
    monkeypatch.setattr(target, name, full_disk)
    with pytest.raises(SystemExit) as e:
        sample.main(tiny(release, "--prompts", prompts, "--layout", "geneval", "--outdir", "out", "--n", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == (f"sample.py: error: cannot write {failing}: No space left on device; "
                                             "the images written so far are whole"), err
    assert not [p for p in Path("out").rglob("*") if p.name.startswith(".tmp")]


def test_a_killed_runs_temporary_files_are_removed_and_only_those(release, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompts = write_dpg(tmp_path / "p.jsonl", ["p0.txt"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                     # its pid is free now: a run killed mid-write
    stale = [f"out/00000/samples/.tmp{dead.pid}-00000.png", f"out/00000/.tmp{dead.pid}-metadata.jsonl",
             f"out/grid_output/.tmp{dead.pid}-p0.png"]
    kept = [f"out/00000/samples/.tmp{os.getppid()}-00001.png",     # a live process's
            f"out/00000/samples/.tmp{dead.pid}-notes.png",         # not a name of this run's
            f"out/00000/samples/.tmp-{dead.pid}-00000.png"]        # not our naming
    for p in stale + kept:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(b"\x89PNG half")
    sample.main(tiny(release, "--prompts", prompts, "--layout", "dpg", "--outdir", "out", "--n", "2"))
    assert "removed 3 temporary file(s) left by a killed run" in capsys.readouterr().err
    assert [p for p in stale if os.path.exists(p)] == [] and all(os.path.exists(p) for p in kept)
    assert os.path.isfile("out/grid_output/p0.png")


HOLDER = """import sys, sample, svgt2i
def hold(*a, **k):                      # a live run: planned and locked, 'loading its weights'
    print("holding", flush=True)
    sys.stdin.read()
    sys.exit(0)
svgt2i.SVGT2I.from_pretrained = classmethod(hold)
sample.main(sys.argv[1:])
"""

RANGES = [   # (the live run's flags, this run's flags, refused)
    (["--layout", "geneval", "--start", "0", "--end", "2"], ["--layout", "geneval", "--seed", "7"], True),
    (["--layout", "geneval", "--start", "0", "--end", "2"], ["--layout", "geneval", "--start", "1"], True),
    (["--layout", "geneval", "--start", "0", "--end", "2"], ["--layout", "dpg", "--start", "1"], True),
    (["--layout", "geneval", "--start", "0", "--end", "2"], ["--layout", "geneval", "--start", "2"], False),
    (["--n", "2"], ["--n", "2", "--seed", "7"], True),
    (["--n", "2", "--end", "1"], ["--n", "2", "--start", "1"], False),
]


@pytest.mark.parametrize("theirs, mine, refused", RANGES, ids=range(len(RANGES)))
def test_overlapping_runs_are_refused_and_disjoint_ranges_share_a_folder(release, tmp_path, monkeypatch, capsys,
                                                                        theirs, mine, refused):
    monkeypatch.chdir(tmp_path)
    prompts = write_dpg(tmp_path / "p.jsonl", ["p0.txt", "p1.txt", "p2.txt"])
    live = subprocess.Popen([sys.executable, "-c", HOLDER, *tiny(release, "--prompts", prompts, "--outdir", "out",
                                                                 *theirs)],
                            cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert live.stdout.readline() == "holding\n"
        argv = tiny(release, "--prompts", prompts, "--outdir", "out", "--n", "1", *mine)
        if refused:
            err = error_line(argv, capsys)
            assert f"--outdir out is in use by another run (pid {live.pid}) drawing some of the same images" in err
        else:
            sample.main(argv)
            assert "images in" in capsys.readouterr().err
    finally:
        live.communicate("", timeout=60)


def test_a_folder_that_cannot_be_locked_is_used_with_a_note(tmp_path, monkeypatch, capsys):
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "lockf", no_locks)       # some network mounts have no locks
    jobs.lock_images(str(tmp_path), "outdir:flat", 0, 4, f"--outdir {tmp_path}").close()
    assert f"{tmp_path} cannot be locked (No locks available): runs into it are not checked" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Input images too large to open (issue #23)

def huge_png(path, side=20000):
    """A PNG header claiming side x side pixels (1-bit grey): PIL refuses it at open, so nothing is allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("flags", [["--init-image", "big.png"], ["--init-image", "in.png", "--mask", "big.png"]],
                         ids=["init-image", "mask"])
def test_an_image_too_large_to_open_is_one_line(release, tmp_path, monkeypatch, capsys, no_loading, flags):
    monkeypatch.chdir(tmp_path)
    huge_png(tmp_path / "big.png")
    plain_png(tmp_path / "in.png")
    err = error_line(tiny(release, "--prompt", "x", *flags), capsys)
    assert err == ("sample.py: error: big.png: too large to read: Image size (400000000 pixels) exceeds limit of "
                   f"{2 * Image.MAX_IMAGE_PIXELS} pixels; downscale it first"), err
    with pytest.raises(Image.DecompressionBombError):       # the data sets' reader: they skip such a file
        files.open_image(tmp_path / "big.png")


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
