"""VQ image tokenizer: one adapter around diffusers' ``VQModel``.

Images in, a grid of integer codes out, and back::

    tok = VQTokenizer(VQConfig())                       # or VQTokenizer.from_pretrained(dir)
    codes = tok.encode_to_codes(images)                 # (N, 3, H, W) in [0, 1] -> (N, h, w) long
    recon = tok.decode_codes(codes)                     # (N, h, w) -> (N, 3, H, W) in [0, 1]

Conventions
-----------
* **Pixel range.** The adapter's public methods take and return images in **[0, 1]** (what
  ``torchvision.transforms.ToTensor`` and the Shapes world produce).  Internally the VQModel sees
  [-1, 1] (``x * 2 - 1``), the convention of every diffusers autoencoder, so a pretrained
  diffusers VQ model loaded from a local directory works unchanged.
* **Codes.** ``h = H / f`` and ``w = W / f`` with the downsample factor
  ``f = 2 ** (len(block_out_channels) - 1)`` (each encoder block but the last halves the size).
  Codes index rows of ``model.quantize.embedding.weight`` (K, D).

How diffusers quantizes, and what we do instead
-----------------------------------------------
``VQModel.encode`` returns the *pre-quantisation* latents (after ``quant_conv``); quantisation
happens inside ``VQModel.decode`` via ``model.quantize`` (``VectorQuantizer``: nearest codebook
row by ``torch.cdist``, straight-through estimator).  ``VectorQuantizer`` is built with
``legacy=True``, whose loss is ``mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)`` - the
commitment and codebook terms swapped relative to the VQ-VAE paper - and its index output is a
flat (N*h*w, 1) column unless ``sane_index_shape``.  To decode *indices*, diffusers needs
``lookup_from_codebook=True`` in the config (``decode(indices, force_not_quantize=True,
shape=...)``).  This adapter therefore does the lookup itself, with the same codebook tensor:

* ``quantize(z)``: nearest code by squared L2 (or by cosine when ``l2_normalize`` is set, i.e.
  both latents and codes are projected to the unit sphere - improves codebook usage);
* ``decode_codes``: ``embedding(codes)`` -> ``post_quant_conv`` -> decoder (the body of
  ``model.decode(z_q, force_not_quantize=True)``, independent of ``lookup_from_codebook``).

The loss terms (codebook, commitment with the paper's beta) are computed by the trainer
(``mmdiff.training.vq_trainer``), which may also replace gradient updates of the codebook with
EMA updates and restart dead codes.  Weights are saved in diffusers format (``config.json`` +
``diffusion_pytorch_model.safetensors``) plus ``mmdiff_vq.json`` for the adapter-only options.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VQConfig", "VQTokenizer", "build_vq_tokenizer"]

ADAPTER_CONFIG_NAME = "mmdiff_vq.json"


@dataclass
class VQConfig:
    """Architecture of the VQ tokenizer (a diffusers ``VQModel``) and the adapter options.

    The downsample factor is derived: ``2 ** (len(block_out_channels) - 1)``.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    latent_channels: int = 16
    num_vq_embeddings: int = 128  # codebook size K
    vq_embed_dim: int | None = 8  # code dimension D (None -> latent_channels)
    norm_num_groups: int = 8
    mid_block_add_attention: bool = False  # attention in the mid block (costly on CPU, unneeded at 32px)
    l2_normalize: bool = True  # cosine codebook: latents and codes on the unit sphere
    # > 0: the image is cut into non-overlapping tiles of this side, each encoded and decoded on
    # its own by the VQModel (whose sample_size is then the tile); the code grids are laid back
    # side by side.  For scenes made of independent cells (the Shapes world's 3x3 grid) a tile
    # per cell with downsample == tile gives one code per cell: 9 image tokens at 48 px.
    tile_size: int = 0
    # > 1: space-to-depth before the VQModel (``pixel_unshuffle``): every p x p pixel patch becomes
    # one position with 3 * p * p channels, and the decoder's output is shuffled back.  With one
    # block (no convolutional downsampling) and ``tile_size == patch_size`` each tile is a single
    # position, so the encoder and decoder act on it as per-tile MLPs: a shallow, fast network
    # that gives one code per Shapes cell at 48 px (the deep downsample-16 conv stack learned
    # too slowly on a CPU; BENCHMARKS.md).
    patch_size: int = 1
    # > 0: the image is cut along a cell_grid x cell_grid grid of layout cells before tiling
    # (pixel x is in cell floor((x + 0.5) * G / S), the Shapes world's rule), every cell is padded
    # with black at its end to the widest cell's side T and the cells are laid side by side: the
    # VQModel sees a G*T canvas whose tiles are exactly the cells, and decoding drops the padding.
    # With tile_size = patch_size = T that is one code per cell, at any image size: 9 codes at
    # 32 px, whose cells are 11, 10 and 11 px wide (the Shapes world has 235 distinct cell
    # patterns there, so a 256-entry codebook can hold each).
    cell_grid: int = 0
    # >= 2: ``decode_codes`` rounds every decoded channel to this many evenly spaced levels (2:
    # each channel 0 or 1), for images known to be made of flat colours (the Shapes world's are
    # exactly 0 or 255 per channel).  Training and ``decode_latents`` see the raw decoder output.
    output_levels: int = 0

    @property
    def cell_side(self) -> int:
        """Side of a padded layout cell (``cell_grid``), 0 without cells."""
        return _cell_layout(self.image_size, self.cell_grid)[2] if self.cell_grid else 0

    def canvas_size(self, image_size: int | None = None) -> int:
        """Side of the image the VQModel sees: the cell canvas with ``cell_grid``, else the image."""
        size = self.image_size if image_size is None else image_size
        return self.cell_grid * _cell_layout(size, self.cell_grid)[2] if self.cell_grid else size

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side: the patch times the convolutional downsampling."""
        return self.patch_size * 2 ** (len(self.block_out_channels) - 1)

    @property
    def code_dim(self) -> int:
        return self.vq_embed_dim if self.vq_embed_dim is not None else self.latent_channels

    def grid_size(self, image_size: int | None = None) -> tuple[int, int]:
        size = self.canvas_size(image_size)
        return size // self.downsample_factor, size // self.downsample_factor

    def validate(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must be positive multiples of "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        if self.tile_size < 0:
            raise ValueError(f"tile_size must be >= 0, got {self.tile_size}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.cell_grid < 0 or (self.cell_grid and not 0 < self.cell_grid <= self.image_size):
            raise ValueError(f"cell_grid must be 0 or in [1, image_size={self.image_size}], got {self.cell_grid}")
        if self.cell_grid and self.cell_side % self.downsample_factor:
            raise ValueError(
                f"cell_grid={self.cell_grid}: cells of {self.cell_side} px (image_size={self.image_size}) are not a "
                f"multiple of the downsample factor {self.downsample_factor}, so codes would straddle cells")
        canvas = self.canvas_size()
        if self.tile_size and (canvas % self.tile_size or self.tile_size % self.downsample_factor):
            raise ValueError(
                f"tile_size={self.tile_size} must divide the image side {canvas} (image_size={self.image_size}"
                f"{f', cell_grid={self.cell_grid}' if self.cell_grid else ''}) and be divisible by "
                f"the downsample factor {self.downsample_factor}")
        if self.image_size <= 0 or canvas % self.downsample_factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by the downsample factor "
                f"{self.downsample_factor} (= patch_size * 2 ** (len(block_out_channels) - 1))"
            )
        if self.output_levels < 0 or self.output_levels == 1:
            raise ValueError(f"output_levels must be 0 (off) or >= 2, got {self.output_levels}")
        if self.num_vq_embeddings < 2:
            raise ValueError(f"num_vq_embeddings must be >= 2, got {self.num_vq_embeddings}")
        if self.latent_channels <= 0 or self.code_dim <= 0 or self.layers_per_block <= 0:
            raise ValueError("latent_channels, vq_embed_dim and layers_per_block must be positive")
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError("in_channels and out_channels must be positive")

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments for ``diffusers.VQModel``."""
        n = len(self.block_out_channels)
        p2 = self.patch_size ** 2
        return dict(
            in_channels=self.in_channels * p2,
            out_channels=self.out_channels * p2,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            sample_size=(self.tile_size or self.image_size) // self.patch_size,
            num_vq_embeddings=self.num_vq_embeddings,
            norm_num_groups=self.norm_num_groups,
            vq_embed_dim=self.vq_embed_dim,
            mid_block_add_attention=self.mid_block_add_attention,
        )


def config_from_diffusers(model_config, l2_normalize: bool = False, tile_size: int = 0, patch_size: int = 1,
                         grid: int | None = None, cell_grid: int = 0, image_size: int = 0,
                         output_levels: int = 0) -> VQConfig:
    """The ``VQConfig`` describing an existing diffusers ``VQModel`` plus the adapter-only options
    (for a local dir without ``mmdiff_vq.json``, or a pipeline's bare ``VQModel`` component).

    The VQModel's channels and sample size count space-to-depth patches; ``grid`` (codes per side
    of the image) gives the image size when the VQModel's own ``sample_size`` is a tile's;
    ``image_size`` (needed with ``cell_grid``, whose canvas is larger than the image) overrides it.
    """
    p2 = patch_size * patch_size
    if int(model_config.in_channels) % p2 or int(model_config.out_channels) % p2:
        raise ValueError(f"vq_patch_size={patch_size}: the VQModel's {model_config.in_channels} input / "
                         f"{model_config.out_channels} output channels are not multiples of patch_size^2 = {p2}")
    config = VQConfig(
        image_size=int(model_config.sample_size) * patch_size,
        in_channels=int(model_config.in_channels) // p2,
        out_channels=int(model_config.out_channels) // p2,
        block_out_channels=list(model_config.block_out_channels),
        layers_per_block=int(model_config.layers_per_block),
        latent_channels=int(model_config.latent_channels),
        num_vq_embeddings=int(model_config.num_vq_embeddings),
        vq_embed_dim=model_config.vq_embed_dim,
        norm_num_groups=int(model_config.norm_num_groups),
        mid_block_add_attention=bool(model_config.mid_block_add_attention),
        l2_normalize=l2_normalize,
        tile_size=tile_size,
        patch_size=patch_size,
    )
    if grid:
        config.image_size = grid * config.downsample_factor
    if image_size:
        config.image_size = int(image_size)
    elif cell_grid:
        raise ValueError("config_from_diffusers: cell_grid needs the image_size (the cell canvas is larger)")
    config.cell_grid, config.output_levels = int(cell_grid), int(output_levels)
    return config


@lru_cache(maxsize=32)
def _cell_layout(size: int, grid: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Index maps between an image side of ``size`` pixels and its padded cell canvas.

    Returns ``(src, dst, side)``: ``src[j]`` is the image pixel shown at canvas position ``j``
    (``size`` = a padding pixel), ``dst[i]`` the canvas position of image pixel ``i``, ``side`` the
    padded cell side.  Pixel ``i`` belongs to cell ``floor((i + 0.5) * grid / size)``.
    """
    cells: list[list[int]] = [[] for _ in range(grid)]
    for i in range(size):
        cells[min(grid - 1, int((i + 0.5) * grid / size))].append(i)
    side = max(len(c) for c in cells)
    src, dst = [], [0] * size
    for c in cells:
        for i in c:
            dst[i] = len(src)
            src.append(i)
        src.extend([size] * (side - len(c)))
    return tuple(src), tuple(dst), side


def _centre_tap_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A stride-1, 'same'-padded convolution of a 1 x 1 input: only the kernel's centre tap sees
    anything but zero padding, so it is a linear map of the channels (the same numbers; the
    convolution kernels of CPU backends run 3-4x slower on such inputs, mostly in backward)."""
    kh, kw = self.kernel_size
    if (x.shape[-2:] == (1, 1) and self.stride == (1, 1) and self.groups == 1 and self.padding_mode == "zeros"
            and self.padding == ((kh - 1) // 2, (kw - 1) // 2) and kh % 2 and kw % 2):
        return F.linear(x.flatten(1), self.weight[:, :, kh // 2, kw // 2], self.bias)[:, :, None, None]
    return nn.Conv2d.forward(self, x)


def _centre_tap_convs(model: nn.Module) -> None:
    """Run every ``Conv2d`` of a VQModel whose latent grid is one position as its centre tap."""
    import types

    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.forward = types.MethodType(_centre_tap_forward, m)


class VQTokenizer(nn.Module):
    """Adapter: images in [0, 1] <-> integer code grids, around ``diffusers.VQModel``."""

    def __init__(self, config: VQConfig | None = None, model: nn.Module | None = None):
        super().__init__()
        from diffusers import VQModel  # local import: diffusers is heavy

        self.config = config if config is not None else VQConfig()
        self.config.validate()
        self.model = model if model is not None else VQModel(**self.config.diffusers_kwargs())
        if int(self.model.config.sample_size) == 1 and len(self.model.config.block_out_channels) == 1:
            _centre_tap_convs(self.model)

    # ------------------------------------------------------------------ properties
    @property
    def codebook_size(self) -> int:
        return self.model.quantize.n_e

    @property
    def codebook(self) -> torch.Tensor:
        """The raw codebook (K, D) - ``model.quantize.embedding.weight``."""
        return self.model.quantize.embedding.weight

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (``VQConfig.downsample_factor``)."""
        return self.config.downsample_factor

    def grid_size(self, image_size: int | None = None) -> tuple[int, int]:
        """(h, w) of the code grid for a square image of side ``image_size``."""
        size = self.config.canvas_size(image_size)
        if size % self.downsample_factor:
            raise ValueError(f"image size {size} not divisible by {self.downsample_factor}")
        return size // self.downsample_factor, size // self.downsample_factor

    def num_tokens(self, image_size: int | None = None) -> int:
        h, w = self.grid_size(image_size)
        return h * w

    # ------------------------------------------------------------------ building blocks
    def normalized_codebook(self) -> torch.Tensor:
        """Codebook as used for lookup: (K, D), unit rows when ``l2_normalize``."""
        e = self.codebook
        return F.normalize(e, dim=-1) if self.config.l2_normalize else e

    def _tiles(self, x: torch.Tensor, t: int | None = None) -> tuple[torch.Tensor, int, int]:
        """(N, C, H, W) -> (N * H/t * W/t, C, t, t) tiles in row-major order, plus (H/t, W/t).

        ``t``: the tile side (default: the config's, for images; the codes per tile, for code grids).
        """
        t = self.config.tile_size if t is None else t
        n, c, hh, ww = x.shape
        if hh % t or ww % t:
            raise ValueError(f"size {hh}x{ww} is not a multiple of the VQ tile side {t}")
        rows, cols = hh // t, ww // t
        x = x.reshape(n, c, rows, t, cols, t).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n * rows * cols, c, t, t), rows, cols

    @staticmethod
    def _untile(x: torch.Tensor, n: int, rows: int, cols: int) -> torch.Tensor:
        """Inverse of ``_tiles``: (N * rows * cols, C, a, b) -> (N, C, rows * a, cols * b)."""
        _, c, a, b = x.shape
        x = x.reshape(n, rows, cols, c, a, b).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, rows * a, cols * b)

    def to_canvas(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> the padded cell canvas (``cell_grid``; padding is 0 = black in [0, 1])."""
        g = self.config.cell_grid
        if not g:
            return images
        hh, ww = images.shape[-2:]
        if hh != ww:
            raise ValueError(f"cell_grid needs square images, got {hh}x{ww}")
        src = torch.tensor(_cell_layout(hh, g)[0], device=images.device)
        x = F.pad(images, (0, 1, 0, 1))  # index hh / ww: the black padding pixel
        return x.index_select(-2, src).index_select(-1, src)

    def from_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_canvas``: drop the cells' padding (the image side is ``config.image_size``)."""
        g = self.config.cell_grid
        if not g:
            return canvas
        size = self.config.image_size
        if canvas.shape[-1] != self.config.canvas_size(size) or canvas.shape[-2] != canvas.shape[-1]:
            raise ValueError(f"cell_grid={g}: a {tuple(canvas.shape[-2:])} canvas is not the "
                             f"{self.config.canvas_size(size)}-px canvas of image_size={size}")
        dst = torch.tensor(_cell_layout(size, g)[1], device=canvas.device)
        return canvas.index_select(-2, dst).index_select(-1, dst)

    def image_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> the tiles the VQModel codes alone (N * rows * cols, 3, t, t), row-major
        (the cell canvas's tiles with ``cell_grid``); needs ``tile_size``."""
        if not self.config.tile_size:
            raise ValueError("image_tiles needs a tiled tokenizer (tile_size > 0)")
        return self._tiles(self.to_canvas(pixel_values))[0]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The VQModel's encoder on model-range pixels (N, 3, H, W), space-to-depth first."""
        p = self.config.patch_size
        return self.model.encode(F.pixel_unshuffle(x, p) if p > 1 else x).latents

    def _decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """The VQModel's decoder on quantised latents (no tiling, no cell layout), depth-to-space last."""
        m, p = self.model, self.config.patch_size
        x = m.decoder(m.post_quant_conv(z_q), z_q if m.config.norm_type == "spatial" else None)
        return F.pixel_shuffle(x, p) if p > 1 else x

    def encode_latents(self, pixel_values: torch.Tensor, tiles: bool = False) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> pre-quantisation latents z (N, D, h, w).

        ``tiles=True``: the input is already tiles (M, 3, t, t) from ``image_tiles``; z is (M, D, g, g).
        """
        if tiles:
            z = self._encode(pixel_values * 2.0 - 1.0)
        else:
            x = self.to_canvas(pixel_values) * 2.0 - 1.0  # [0, 1] -> [-1, 1]
            if self.config.tile_size:
                t, rows, cols = self._tiles(x)
                z = self._untile(self._encode(t), x.shape[0], rows, cols)
            else:
                z = self._encode(x)  # (N, D, h, w)
        return F.normalize(z, dim=1) if self.config.l2_normalize else z

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code for every latent vector: z (N, D, h, w) -> (z_q (N, D, h, w), codes (N, h, w)).

        No straight-through here; the trainer adds it.
        """
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (N*h*w, D)
        e = self.normalized_codebook()  # (K, D)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2 ; the ||z||^2 term is constant per row
        dist = (e * e).sum(-1)[None, :] - 2.0 * flat @ e.t()  # (N*h*w, K)
        codes = dist.argmin(dim=-1)  # (N*h*w,)
        z_q = e[codes].view(n, h, w, d).permute(0, 3, 1, 2)  # (N, D, h, w)
        return z_q, codes.view(n, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, h, w) long -> code vectors (N, D, h, w)."""
        return self.normalized_codebook()[codes].permute(0, 3, 1, 2)

    def decode_latents(self, z_q: torch.Tensor, tiles: bool = False) -> torch.Tensor:
        """Quantised latents (N, D, h, w) -> images (N, 3, H, W) in model range [-1, 1] (unclamped).

        Same path as ``VQModel.decode(..., force_not_quantize=True)`` with ``lookup_from_codebook``
        off, written out so that it does not depend on that config flag.  ``tiles=True``: z_q holds
        tiles' latents (M, D, g, g) and the result is those tiles (M, 3, t, t).
        """
        if tiles:
            return self._decode(z_q)
        if self.config.tile_size:
            g = self.config.tile_size // self.downsample_factor  # codes per tile side
            t, rows, cols = self._tiles(z_q, g)
            return self.from_canvas(self._untile(self._decode(t), z_q.shape[0], rows, cols))
        return self.from_canvas(self._decode(z_q))

    @torch.no_grad()
    def code_features(self) -> torch.Tensor:
        """(K, F) what each code stands for: with one code per tile (``tile_size`` = the downsample
        factor, e.g. a cell tokenizer) the pixels of the tile it decodes to, in [0, 1]; otherwise the
        lookup codebook itself (a code's pixels depend on its neighbours there)."""
        k = self.codebook_size
        if self.config.tile_size and self.config.tile_size == self.downsample_factor:
            tiles = self.decode_latents(self.lookup(torch.arange(k, device=self.codebook.device).view(k, 1, 1)),
                                        tiles=True)  # (K, 3, t, t) in [-1, 1]
            return ((tiles + 1.0) / 2.0).clamp(0.0, 1.0).flatten(1).float()
        return self.normalized_codebook().detach().float()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode_to_codes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) **in [0, 1]** -> codes (N, h, w) long in [0, codebook_size)."""
        if pixel_values.dim() != 4:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {tuple(pixel_values.shape)}")
        _, codes = self.quantize(self.encode_latents(pixel_values))
        return codes.long()

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (N, h, w) long -> images (N, 3, H, W) **in [0, 1]** (clamped)."""
        if codes.dim() == 2:  # (N, h*w) flat token rows from a sequence model
            side = int(round(codes.shape[1] ** 0.5))
            if side * side != codes.shape[1]:
                raise ValueError(f"cannot reshape {codes.shape[1]} codes into a square grid")
            codes = codes.view(codes.shape[0], side, side)
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        x = self.decode_latents(self.lookup(codes.long()))  # (N, 3, H, W) in [-1, 1]
        x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        if self.config.output_levels:
            steps = self.config.output_levels - 1
            x = torch.round(x * steps) / steps
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Reconstruction (N, 3, H, W) in [0, 1] through the quantiser (no gradients to codes)."""
        return self.decode_codes(self.encode_to_codes(pixel_values))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """diffusers format (config.json + safetensors) plus ``mmdiff_vq.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, l2_normalize: bool | None = None) -> "VQTokenizer":
        """Load from a local directory written by ``save_pretrained`` (or any diffusers VQModel dir).

        Without ``mmdiff_vq.json`` the adapter options default to plain L2 lookup
        (``l2_normalize=False``), i.e. diffusers' own quantisation.
        """
        from diffusers import VQModel

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"VQ tokenizer directory not found: {directory}")
        model = VQModel.from_pretrained(directory, local_files_only=True, use_safetensors=True)
        sidecar = directory / ADAPTER_CONFIG_NAME
        if sidecar.is_file():
            from mmdiff.config import from_dict

            config = from_dict(VQConfig, json.loads(sidecar.read_text()))
        else:
            config = config_from_diffusers(model.config)
        if l2_normalize is not None:
            config.l2_normalize = l2_normalize
        return cls(config, model=model)


def build_vq_tokenizer(config: VQConfig | None = None, path: str | Path | None = None) -> VQTokenizer:
    """A tokenizer from a local directory (``path``) or freshly initialised from ``config``."""
    if path is not None:
        return VQTokenizer.from_pretrained(path)
    return VQTokenizer(config)
