"""The SVG autoencoder (svgt2i.Autoencoder / load_autoencoder) loaded from tiny checkpoints in the official
Lightning layout, checked against its parts applied by hand."""

import pytest
import torch
from PIL import Image

from dinov3 import IMAGENET_MEAN, IMAGENET_STD
from plumbing.loading import load_autoencoder, load_decoder, load_dinov3
from svgt2i import images_to_tensor, match_distribution, tensor_to_images
from tiny_autoencoder import write_lightning_ckpt
from tiny_dinov3 import write_official_pth


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ae")
    return {"P": write_lightning_ckpt(d / "svg_autoencoder-P-stage3.ckpt", kind="P", seed=1),
            "R": write_lightning_ckpt(d / "svg_autoencoder-R-stage3.ckpt", kind="R", seed=2),
            "decoder_only": write_lightning_ckpt(d / "decoder_only.ckpt", kind="P", encoder_sd={}, seed=3),
            "dir": d}


def dino_features_by_hand(path, images):
    """ImageNet-normalise [-1, 1] images and take DINOv3's patch tokens as [B, C, h, w] (row-major)."""
    dino = load_dinov3(path)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    tokens = dino(((images + 1) / 2 - mean) / std)                  # [B, h*w, C]
    B, _, H, W = images.shape
    return torch.stack([tokens[b].T.reshape(-1, H // 16, W // 16) for b in range(B)])


@pytest.mark.parametrize("hw", [(32, 32), (32, 64), (48, 16)])
def test_encode_p_equals_dinov3_by_hand(ckpts, hw):
    ae = load_autoencoder(ckpts["P"]["path"])
    assert ae.residual is None and ae.latent_channels == ckpts["P"]["z_channels"]
    images = torch.rand(2, 3, *hw) * 2 - 1
    z = ae.encode(images)
    assert z.shape == (2, ckpts["P"]["z_channels"], hw[0] // 16, hw[1] // 16)
    torch.testing.assert_close(z, dino_features_by_hand(ckpts["P"]["path"], images), rtol=0, atol=1e-6)


def test_encode_r_appends_matched_residual_channels(ckpts):
    ae = load_autoencoder(ckpts["R"]["path"])
    assert ae.residual is not None and ae.latent_channels == ckpts["R"]["z_channels"]
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    z = ae.encode(images)
    C = z.shape[1] - 8
    h, r = z[:, :C].flatten(2), z[:, C:].flatten(2)
    torch.testing.assert_close(z[:, :C], dino_features_by_hand(ckpts["R"]["path"], images), rtol=0, atol=1e-6)
    # distribution matching: the residual channels take the DINO features' scalar statistics
    # (per-channel mean and unbiased std over batch and tokens, averaged over channels)
    stat = lambda x: (x.mean(dim=(0, 2)).mean(), x.std(dim=(0, 2)).mean())
    torch.testing.assert_close(stat(r)[0], stat(h)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(stat(r)[1], stat(h)[1], rtol=1e-4, atol=0)
    raw = ae.residual(((images + 1) / 2 - ae.pixel_mean) / ae.pixel_std)
    torch.testing.assert_close(r, match_distribution(h, raw), rtol=0, atol=1e-6)


def test_decode_is_the_decoder(ckpts):
    ae = load_autoencoder(ckpts["P"]["path"])
    dec = load_decoder(ckpts["P"]["path"])
    z = torch.randn(1, ckpts["P"]["z_channels"], 2, 3)
    out = ae.decode(z)
    assert out.shape == (1, 3, 32, 48)
    assert torch.equal(out, dec(z))


def test_decoder_only_checkpoint_takes_dinov3_from_file(ckpts):
    d = ckpts["dir"]
    write_official_pth(d / "dinov3_vits16plus_pretrain_lvd1689m-test.pth", seed=7)
    ae = load_autoencoder(ckpts["decoder_only"]["path"], dinov3_path=str(d / "dinov3_vits16plus_pretrain_lvd1689m-test.pth"))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ae.encode(images), dino_features_by_hand(str(d / "dinov3_vits16plus_pretrain_lvd1689m-test.pth"), images),
                               rtol=0, atol=1e-6)
    no_enc = load_autoencoder(ckpts["decoder_only"]["path"])
    with pytest.raises(ValueError, match="without its DINOv3 encoder"):
        no_enc.encode(images)
    assert load_autoencoder(ckpts["P"]["path"], encoder=False).encoder is None


def test_bad_inputs(ckpts, tmp_path):
    ae = load_autoencoder(ckpts["P"]["path"])
    with pytest.raises(ValueError, match="multiple of 16"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    write_official_pth(tmp_path / "dino.pth")
    with pytest.raises(ValueError, match="no 'decoder.\\*' keys"):
        load_autoencoder(str(tmp_path / "dino.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_autoencoder(str(tmp_path / "missing.ckpt"))
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read"):
        load_autoencoder(str(tmp_path / "junk.ckpt"))


def test_reconstruct_and_pixel_conversions(ckpts):
    ae = load_autoencoder(ckpts["P"]["path"])
    img = Image.new("RGB", (40, 35), (255, 0, 128))
    assert ae.reconstruct(img).size == (32, 32)          # cropped to multiples of 16
    x = images_to_tensor([img])
    assert x.shape == (1, 3, 35, 40)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    back = tensor_to_images(torch.tensor([-1.0, 0.0, 1.0, 0.999]).view(1, 1, 2, 2).expand(1, 3, 2, 2))[0]
    assert list(back.getdata()) == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 255, 255)]   # rounded
