"""Sample grids: the one path from a pipeline and a list of seeds to the grid image a person looks at.

The training run's grids (`samples/fakes_*.png`), the grid of an exported pipeline's model card (`samples_grid.png`)
and `sida-sample --grid` are all `sample_grid`: image i is made from seed i alone through `generate_uint8` (its
noise, then its class label, drawn uniformly from the classes, come from a CPU generator seeded with it), the images
are tiled in seed order, and the grid is enlarged by an integer factor with nearest-neighbour upsampling so that a
16-32 px model is visible and every pixel is still one of the model's. For the same pipeline and seeds the three are
the same pixels.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import PIL.Image

from sida_diffusers.pipelines.pipeline_sida import uint8_to_pil


GRID_MIN_WIDTH = 256  # a 16-32 px grid is a smudge on a model page: enlarged to at least this width
GRID_BATCH = 64


def image_grid(images: Sequence[PIL.Image.Image], cols: Optional[int] = None) -> PIL.Image.Image:
    """Tile equally sized images row by row: ceil(sqrt(n)) columns by default, the last row padded with black."""
    if not images:
        raise ValueError("image_grid needs at least one image.")
    cols = cols or math.ceil(math.sqrt(len(images)))
    width, height = images[0].size
    grid = PIL.Image.new(images[0].mode, (cols * width, math.ceil(len(images) / cols) * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    return grid


def upscale_nearest(image: PIL.Image.Image, min_width: int = GRID_MIN_WIDTH) -> PIL.Image.Image:
    """`image` enlarged by the smallest integer factor that makes it at least `min_width` wide, nearest-neighbour, so
    every pixel stays one of the model's (a factor of 1 returns it unchanged)."""
    factor = max(1, math.ceil(min_width / image.width))
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST) if factor > 1 else image


def grid_image(images, min_width: int = GRID_MIN_WIDTH) -> PIL.Image.Image:
    """uint8 images ``[N, C, H, W]`` (as `generate_uint8` returns them) tiled in order, enlarged by `upscale_nearest`
    (`min_width=0`: not enlarged)."""
    return upscale_nearest(image_grid(uint8_to_pil(images.permute(0, 2, 3, 1).numpy())), min_width)


def sample_grid(pipe, seeds: Sequence[int], batch_size: int = GRID_BATCH, min_width: int = GRID_MIN_WIDTH,
                **call_kwargs) -> PIL.Image.Image:
    """The grid of `pipe`'s images for `seeds` (see the module docstring), made with the generator in eval mode
    (dropout off, as for evaluation, ALGORITHM.md §9.1); `call_kwargs` go to the pipeline (e.g. num_inference_steps)."""
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    try:
        images = pipe.generate_uint8(list(seeds), batch_size=batch_size, **call_kwargs)
    finally:
        unet.train(was_training)
    return grid_image(images, min_width)
