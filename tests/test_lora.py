"""LoRA (nextdit.py's section, train.py --lora, sample.py --lora): a fresh adapter changes no output, merged equals
unadapted-plus-update, only the adapters train and are saved, a killed LoRA run resumes bit for bit, sample.py and the
Python API merge the file (hand-derived W + alpha / r B A), and bad input is one line with exit code 2."""

import dataclasses
import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nextdit
import train
from nextdit import NextDiT, NextDiTConfig, add_lora, lora_state_dict, merge_lora
from plumbing import loading
from test_train import (ROOT, assert_grads_match, assert_within_adam_reach, common, log_records, make_world,
                        run_cli)
from tiny_nextdit import official_state_dict, write_official_consolidated
from train_harness import instruments

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dataclasses.replace(NextDiTConfig.tiny(), in_channels=32, cap_feat_dim=32)   # the tiny world's widths
ALL_TARGETS = nextdit.LORA_TARGETS + nextdit.LORA_OPTIONAL


def random_model(config=CONFIG, seed=0):
    """A NextDiT with random weights everywhere (its own init zeroes the final layer: every output would be 0)."""
    model = NextDiT(config)
    model.load_state_dict(official_state_dict(config, seed))
    return model.eval()


def inputs(config=CONFIG, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, 3, 4, generator=g)
    cap = torch.randn(2, 5, config.cap_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return x, torch.tensor([0.3, 0.8]), cap, mask


def randomise_adapters(model, seed=2, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("targets", [nextdit.LORA_TARGETS, ("adaLN_modulation",), ALL_TARGETS, ("qkv",)])
def test_a_fresh_adapter_changes_no_output_and_a_trained_one_does(targets):
    model = random_model()
    with torch.no_grad():
        before = model(*inputs())
    add_lora(model, rank=4, alpha=8, targets=targets)
    layers = [n for n, m in model.named_modules() if isinstance(m, nextdit.LoRALinear)]
    # each of qkv, out, w1, w2, w3 once in every block (both refiners and the joint blocks); adaLN_modulation in the
    # modulated blocks (all but the context refiner) and the final layer
    blocks = 2 * CONFIG.n_refiner_layers + CONFIG.n_layers
    expected = sum(blocks for t in targets if t != "adaLN_modulation") + \
        (CONFIG.n_refiner_layers + CONFIG.n_layers + 1) * ("adaLN_modulation" in targets)
    assert len(layers) == expected
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_state_dict(model))
    with torch.no_grad():
        fresh = model(*inputs())
    assert torch.equal(before, fresh)                        # B = 0: exact zeros added
    randomise_adapters(model)
    with torch.no_grad():
        trained = model(*inputs())
    assert (trained - before).abs().max() > 1e-3


def test_adapter_init_is_kaiming_uniform_and_b_zero():
    model = add_lora(random_model(), rank=8, alpha=8)
    layer = model.layers[0].attention.qkv
    bound = 1 / CONFIG.dim ** 0.5                          # kaiming_uniform(a=sqrt 5): U(-1/sqrt(in), 1/sqrt(in))
    A = layer.lora_A.weight
    assert A.shape == (8, CONFIG.dim) and A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    assert layer.lora_B.weight.shape == (layer.out_features, 8) and not layer.lora_B.weight.any()
    assert layer.weight is model.layers[0].attention.qkv.weight and not hasattr(layer, "base")


def test_merged_equals_the_adapted_model_and_a_negative_merge_takes_it_out():
    adapted = add_lora(random_model(), rank=4, alpha=6, targets=ALL_TARGETS)
    randomise_adapters(adapted)
    plain = random_model()
    merge_lora(plain, lora_state_dict(adapted), alpha=6)
    with torch.no_grad():
        a, m = adapted(*inputs()), plain(*inputs())
    assert (a - m).abs().max() < 1e-5 * a.abs().max()
    # one layer by hand: W + (alpha / r) B A
    qkv = adapted.layers[1].attention.qkv
    expected = qkv.weight + 6 / 4 * qkv.lora_B.weight @ qkv.lora_A.weight
    assert torch.allclose(plain.layers[1].attention.qkv.weight, expected, atol=1e-6)
    # unmerged: back to the base weights to within the rounding of one add
    merge_lora(plain, lora_state_dict(adapted), alpha=6, scale=-1.0)
    base = official_state_dict(CONFIG, 0)
    worst = max((plain.state_dict()[k] - v).abs().max().item() for k, v in base.items())
    assert 0 < worst < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# train.py --lora


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    w = make_world(root)
    w["base"] = write_official_consolidated(root / "dit-official", CONFIG, seed=3)
    return w


def lora_args(w, out, steps=2, *extra):
    return common(w, out, steps, 4, 2, "--init-from", str(w["base"]), "--stats", w["stats"], "--lora", "4",
                  "--lr", "1e-2", *extra)


def test_only_the_adapters_train_and_are_saved(world, tmp_path):
    out = tmp_path / "run"
    base_bytes = world["base"].read_bytes()
    train.main(lora_args(world, out, 2, "--lora-alpha", "8", "--save-every", "2"))
    ckpt = out / "ckpt-0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latent_stats.pt", "lora.safetensors", "lora_train.safetensors",
                                                     "optimizer.pt", "run.json", "state.pt"]
    live, ema = load_file(str(ckpt / "lora_train.safetensors")), load_file(str(ckpt / "lora.safetensors"))
    fresh = lora_state_dict(add_lora(NextDiT(CONFIG), 4, 8))
    assert live.keys() == ema.keys() == fresh.keys()              # adapters only, every one of them
    assert all(live[k].shape == fresh[k].shape and live[k].dtype == torch.float32 for k in live)
    assert all(live[k].any() for k in live if ".lora_B" in k)       # B moved off zero
    with safe_open(str(ckpt / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["lora_rank"], meta["lora_alpha"], meta["lora_targets"]) == ("4", "8.0", "qkv,out,w1,w2,w3")
    assert meta["lora_base"] == str(world["base"])
    assert world["base"].read_bytes() == base_bytes
    # AdamW holds a state for each adapter and nothing else
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    shapes = sorted(tuple(s["exp_avg"].shape) for s in opt["state"].values())
    assert shapes == sorted(tuple(v.shape) for v in fresh.values())
    run = json.loads((ckpt / "run.json").read_text())
    assert run["args"]["lora"] == 4 and run["args"]["lora_targets"] == list(nextdit.LORA_TARGETS)
    # a LoRA checkpoint is not a DiT to sample: one line says what to do
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--gemma", world["gemma"],
                        "--prompt", "x", "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a train.py --lora checkpoint (adapters only): sample its base with --lora" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_base_is_frozen_and_gets_no_gradient(world):
    args = train.finish_args(train.parse_args(lora_args(world, "/tmp/unused-out")))
    dit = loading.lora_model(world["base"], args, CONFIG, "cpu", bf16=False)
    trainable = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(dit)) and trainable
    randomise_adapters(dit)
    dit(*inputs()).square().mean().backward()
    assert all((p.grad is None) != p.requires_grad for p in dit.parameters())
    # bf16 training keeps the base in bf16 (no fp32 master) and the adapters in fp32
    dit16 = loading.lora_model(world["base"], args, CONFIG, "cpu", bf16=True)
    dtypes = {n: p.dtype for n, p in dit16.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}


def test_a_killed_lora_run_resumes_bit_for_bit(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["--save-every", "2", "--keep", "1"]
    train.main(lora_args(world, a, 4, *extra))
    r = run_cli(lora_args(world, b, 4, *extra), instruments=["--kill-after-step", "3"])
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (b / "latest").read_text().strip() == "ckpt-0000002"
    train.main(lora_args(world, b, 4, *extra) + ["--resume"])
    for name in ("lora.safetensors", "lora_train.safetensors"):
        x, y = load_file(str(a / "ckpt-0000004" / name)), load_file(str(b / "ckpt-0000004" / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    oa, ob = (torch.load(d / "ckpt-0000004/optimizer.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(s[k], ob["state"][i][k]) for i, s in oa["state"].items() for k in s)
    assert [r["loss"] for r in log_records(a)] == [r["loss"] for r in log_records(b)]


def test_two_ddp_processes_match_one_process_with_lora(world, tmp_path):
    """train.py --lora on 2 gloo processes against one, compared as test_train's DDP test compares full runs: the
    adapters' gradients (the only ones there are) step by step, their weights within Adam's reach."""
    args = ["--init-from", str(world["base"]), "--stats", world["stats"], "--lora", "4"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    with instruments(single, dump_grads=True):
        train.main(common(world, single, 2, 4, 4, *args))
    r = run_cli(common(world, ddp, 2, 4, 1, *args), torchrun=2, instruments=["--dump-grads"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replicas identical on 2 ranks" in r.stdout
    assert_grads_match(single, [ddp, ddp], ranks=(0, 1), steps=(1, 2))
    ws, wd = (load_file(str(d / "ckpt-0000002/lora_train.safetensors")) for d in (single, ddp))
    assert len(ws) == len(load_file(str(single / "grads-0000001-rank0.safetensors")))   # adapters: all that trains
    assert_within_adam_reach(ws, wd, steps=2)


def test_a_lora_run_needs_its_own_flags_to_resume(world, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(lora_args(world, out, 1))
    for extra, says in ((["--lora", "8"], "lora_rank is 4, this run's 8"),
                        (["--lora-alpha", "2"], "lora_alpha is 4.0, this run's 2.0")):
        with pytest.raises(SystemExit) as e:
            train.main(lora_args(world, out, 2, "--resume", *extra))
        assert e.value.code == 2 and says in capsys.readouterr().err
    del e                   # (its traceback holds the run's lock, as a process that exits would not)
    full = tmp_path / "full"
    train.main(common(world, full, 1, 4, 2, "--stats", world["stats"]))
    with pytest.raises(SystemExit):
        train.main(lora_args(world, full, 2, "--resume"))
    assert "not a LoRA checkpoint: drop --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(common(world, out, 2, 4, 2, "--stats", world["stats"], "--resume"))
    assert "a LoRA checkpoint: add its --lora" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--lora", "0"], "--lora 0: the adapters' rank must be a positive integer"),
    (["--lora", "-4"], "--lora -4: the adapters' rank must be a positive integer"),
    (["--lora", "4", "--lora-targets", "qkv,attn"], "--lora-targets 'qkv,attn': unknown 'attn'; choose among"),
    (["--lora", "4", "--lora-targets", ","], "--lora-targets ',': empty"),
    (["--lora", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: must be positive"),
    (["--lora", "4"], "--lora needs --init-from"),
    (["--lora-alpha", "4"], "--lora-alpha and --lora-targets go with --lora RANK"),
    (["--lora", "4", "--init-from", "BASE", "--parallel", "fsdp"], "--lora with --parallel fsdp: not supported"),
])
def test_bad_lora_flags_are_one_line_before_any_work(world, tmp_path, capsys, flags, says):
    out = tmp_path / "never"
    flags = [str(world["base"]) if f == "BASE" else f for f in flags]
    with pytest.raises(SystemExit) as e:
        train.main(common(world, out, 1, 4, 2, "--stats", world["stats"], *flags))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_base_that_does_not_fit_the_frozen_parts_is_one_line(world, tmp_path, capsys):
    other = write_official_consolidated(tmp_path / "other", dataclasses.replace(CONFIG, cap_feat_dim=48))
    with pytest.raises(SystemExit) as e:
        train.main(common(world, tmp_path / "run", 1, 4, 2, "--stats", world["stats"], "--lora", "4",
                          "--init-from", str(other)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "its DiT has cap_feat_dim 48, the frozen parts give 32" in err


# ---------------------------------------------------------------------------------------------------------------
# sampling: sample.py --lora, SVGT2I.load_lora


def write_lora(path, model_config, rank=4, alpha=8.0, seed=5, targets=nextdit.LORA_TARGETS, rename=None):
    """A LoRA file as train.py --lora writes it, random A and B, for a model of `model_config`."""
    adapters = lora_state_dict(add_lora(NextDiT(model_config), rank, alpha, targets))
    g = torch.Generator().manual_seed(seed)
    adapters = {(rename(k) if rename else k): 0.05 * torch.randn(v.shape, generator=g) for k, v in adapters.items()}
    meta = loading.lora_metadata(dict(rank=rank, alpha=alpha, targets=list(targets)))
    save_file(adapters, str(path), metadata=meta)
    return adapters


TOY = ROOT / "assets" / "toy"


def toy_config():
    return json.loads((TOY / "run.json").read_text())["model"]["config"]


def test_the_pipeline_merges_a_lora_file_as_derived_by_hand(tmp_path):
    from svgt2i import SVGT2I
    config = NextDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in toy_config().items()})
    adapters = write_lora(tmp_path / "l.safetensors", config, alpha=8.0)
    gemma = str(TOY / "text_encoder")
    plain = SVGT2I.from_pretrained(str(TOY), gemma, dtype=torch.float32)
    pipe = SVGT2I.from_pretrained(str(TOY), gemma, dtype=torch.float32, lora=[(tmp_path / "l.safetensors", 0.5)])
    assert pipe.files["lora"] == [(str(tmp_path / "l.safetensors"), 0.5)]
    for name in ("layers.2.feed_forward.w2", "noise_refiner.0.attention.qkv", "context_refiner.0.attention.out"):
        W = plain.dit.get_submodule(name).weight
        A, B = adapters[name + ".lora_A.weight"], adapters[name + ".lora_B.weight"]
        assert torch.allclose(pipe.dit.get_submodule(name).weight, W + 0.5 * 8.0 / 4 * B @ A, atol=1e-6)
    untouched = "x_embedder.weight"
    assert torch.equal(pipe.dit.state_dict()[untouched], plain.dit.state_dict()[untouched])
    loading.apply_lora(plain.dit, tmp_path / "l.safetensors", 0.5)     # the same merge after loading
    assert all(torch.equal(v, pipe.dit.state_dict()[k]) for k, v in plain.dit.state_dict().items())


def sample(*args):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--toy", "--prompt", "two red circles on the left", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_sample_py_reads_lora_files_and_records_them(tmp_path):
    from PIL import Image
    config = NextDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in toy_config().items()})
    lora = tmp_path / "l.safetensors"
    write_lora(lora, config, alpha=4.0)
    for name, extra in (("plain", []), ("zero", ["--lora", f"{lora}:0"]), ("one", ["--lora", str(lora)]),
                        ("twice", ["--lora", f"{lora}:0.5", "--lora", f"{lora}:0.5"])):
        r = sample("--out", str(tmp_path / f"{name}.png"), "--steps", "4", *extra)
        assert r.returncode == 0, r.stderr
    px = {n: torch.tensor(list(Image.open(tmp_path / f"{n}.png").getdata())) for n in ("plain", "zero", "one", "twice")}
    assert torch.equal(px["plain"], px["zero"]) and not torch.equal(px["plain"], px["one"])
    assert (px["one"] - px["twice"]).abs().max() <= 2          # two halves merge as one whole, to rounding
    meta = Image.open(tmp_path / "twice.png").text
    assert meta["lora"] == f"{lora}:0.5; {lora}:0.5" and "lora" not in Image.open(tmp_path / "plain.png").text


@pytest.mark.parametrize("make, says", [
    ("shapes", "adapts a 96 x 96 layer, but this DiT's context_refiner.0.attention.out is (192, 192)"),
    ("names", "this DiT has no linear layer 'blocks.0.attn.out' (a LoRA of another model)"),
    ("unpaired", "is not one of a pair of adapter matrices"),
    ("no-metadata", "not a LoRA file of train.py --lora"),
    ("missing", "no such file"),
    ("bad-scale", "use FILE or FILE:SCALE with a finite scale"),
])
def test_a_lora_of_another_model_is_one_line_exit_2(tmp_path, make, says):
    config = NextDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in toy_config().items()})
    lora = tmp_path / "l.safetensors"
    if make == "shapes":
        write_lora(lora, dataclasses.replace(config, dim=96, n_heads=2, n_kv_heads=1))
    elif make == "names":
        write_lora(lora, config, rename=lambda k: k.replace("layers.0.attention.", "blocks.0.attn."))
    elif make == "unpaired":
        adapters = write_lora(lora, config)
        adapters.pop("layers.1.feed_forward.w1.lora_B.weight")
        save_file(adapters, str(lora), metadata={"lora_alpha": "4.0"})
    elif make == "no-metadata":
        save_file(write_lora(lora, config), str(lora))
    flag = {"missing": str(tmp_path / "nope.safetensors"), "bad-scale": f"{lora}:inf"}.get(make, str(lora))
    if make == "bad-scale":
        lora.write_bytes(b"")
    r = sample("--lora", flag, "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.png").exists()

