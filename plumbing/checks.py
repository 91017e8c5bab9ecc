"""
Input checks, once, where input enters: an image size (a multiple of 16), and the arguments of
SVGT2I.generate (seeds, solver, output, the edit's images, strength and masks), each a one-line
ValueError that says what to pass instead.

You need not read this to learn SVG-T2I.
"""

from PIL import Image


def check_image_size(height, width):
    """Image sides must be positive multiples of 16 (one DINOv3 patch, one latent token)."""
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} (HxW) is not a multiple of 16: use sizes "
                         "divisible by 16, e.g. "
                         f"{max(16, round(height / 16) * 16)}x{max(16, round(width / 16) * 16)}")


def check_strength(strength):
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
            or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")


def one_per_prompt(items, n, what):
    """A PIL image or a list of them -> one per prompt (a single one serves every prompt)."""
    items = [items] if isinstance(items, Image.Image) else list(items)
    if not items or not all(isinstance(i, Image.Image) for i in items):
        raise ValueError(f"{what} must be a PIL image or a list of them")
    if len(items) not in (1, n):
        raise ValueError(f"{len(items)} {what} for {n} prompts: give one, or one per prompt")
    return items * n if len(items) == 1 else items


def check_masks(images, masks):
    """Each mask (or None: no masks) the size of its init image."""
    for im, m in zip(images, masks or ()):
        if m.size != im.size:
            raise ValueError(f"the mask is {m.size[0]}x{m.size[1]} px but its init image "
                             f"{im.size[0]}x{im.size[1]}: they must be the same size")


def check_generate(pipe, prompts, seeds, height, width, sampling, solvers, output, init_images,
                   strength, mask):
    """SVGT2I.generate's arguments (`solvers`: the sampler names). Returns the init images and
    masks, one per prompt (None for text-to-image, or without a mask)."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    check_image_size(height, width)
    if sampling.solver not in solvers:
        raise ValueError(f"unknown solver {sampling.solver!r}: choose one of "
                         f"{', '.join(solvers)}")
    if output not in ("pil", "latent"):
        raise ValueError(f"output must be 'pil' or 'latent', got {output!r}")
    if init_images is None:
        if mask is not None or strength != 1:
            raise ValueError("strength and mask are for image-to-image: pass init_images too")
        return None, None
    check_strength(strength)
    images = one_per_prompt(init_images, len(prompts), "init_images")
    masks = None if mask is None else one_per_prompt(mask, len(prompts), "masks")
    check_masks(images, masks)
    if pipe.autoencoder.encoder is None:
        raise ValueError("image-to-image needs the DINOv3 encoder: load the pipeline with "
                         "SVGT2I.from_pretrained(..., with_encoder=True)")
    return images, masks
