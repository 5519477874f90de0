"""Images as tokens: Llama 4's vision encoder, pixel-shuffle adapter and projector (seed 003).

    image (3, H, W) --patchify--> (N, 3 p p) --patch_emb--> (N, Cv) + class token + learned positions
      --LayerNorm--> ViT layers (bidirectional attention with 2D RoPE over the patch grid, GELU MLP)
      --LayerNorm, drop the class token--> (N, Cv) --pixel shuffle--> (N r^2, Cv / r^2)
      --MLP adapter--> (N r^2, P) --projector--> (N r^2, C): one text-model embedding per image token

The language model then writes these vectors, in order, over the embeddings of the positions where
the text holds the image token (`merge_image_features`); everything after that is ordinary text.
Patch order is row-major over the grid; Llama 4 appends the class token *after* the patches.
2D RoPE (as in Pixtral): of a head's D/2 rotated pairs, the first D/4 turn with the patch's column
x + 1 and the last D/4 with its row y + 1, at frequencies theta ** (-4 i / D); the class token is not
rotated. Pixel shuffle with ratio r = 1/s folds each s x s block of neighbouring patches into one
token (row-major within the block), so an image costs s^2 times fewer text positions.
Legend: I images, N patches per image (grid_size ** 2), G grid_size, p patch_size, Cv vision width,
H heads, D head_dim, P projector_dim, C the text model's d_model, s = 1 / pixel_shuffle_ratio.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import VisionConfig
from .rope import apply_rope


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(I, 3, H, W) -> (I, N, 3 p p): non-overlapping p x p patches in row-major order, each flattened
    channel first, then patch row, then patch column (the order of `torch.nn.Unfold`)."""
    I, ch, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H} x {W} is not a multiple of patch_size {p}")
    x = images.reshape(I, ch, H // p, p, W // p, p)    # (I, 3, Gy, p, Gx, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                    # (I, Gy, Gx, 3, p, p)
    return x.reshape(I, (H // p) * (W // p), ch * p * p)  # (I, N, 3 p p)


def patchify_unfold(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The reference for `patchify`: torch's sliding-window `unfold` with stride = kernel. (I, N, 3 p p)."""
    return F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(I, N, Cv) patch features on a square grid -> (I, N r^2, Cv / r^2): each s x s block of patches
    (s = 1 / ratio) becomes one token, the concatenation of its patches in row-major order."""
    I, N, Cv = x.shape
    G, s = math.isqrt(N), round(1 / ratio)
    if G * G != N or G % s or abs(s * ratio - 1) > 1e-9:
        raise ValueError(f"pixel_shuffle needs a square grid whose side is a multiple of 1/ratio: "
                         f"got {N} patches and ratio {ratio}")
    x = x.reshape(I, G // s, s, G // s, s, Cv)         # (I, row block, a, column block, b, Cv)
    x = x.permute(0, 1, 3, 2, 4, 5)                    # (I, G/s, G/s, s, s, Cv)
    return x.reshape(I, (G // s) ** 2, s * s * Cv)     # (I, N / s^2, s^2 Cv)


def pixel_shuffle_loop(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """The slow reference for `pixel_shuffle`: build each token from its block, one at a time."""
    I, N, Cv = x.shape
    G, s = math.isqrt(N), round(1 / ratio)
    grid = x.reshape(I, G, G, Cv)  # (I, row, column, Cv)
    tokens = [torch.cat([grid[:, s * k + a, s * j + b] for a in range(s) for b in range(s)], dim=-1)
              for k in range(G // s) for j in range(G // s)]  # each (I, s^2 Cv)
    return torch.stack(tokens, dim=1)  # (I, N / s^2, s^2 Cv)


def vision_rope_angles(grid_size: int, head_dim: int, theta: float) -> torch.Tensor:
    """2D RoPE angles for the N = G^2 patches (row-major) and then the class token: (N + 1, D/2) float64.
    Pair i < D/4 turns with column x + 1, pair D/4 + i with row y + 1, both at frequency
    theta ** (-4 i / D); the class token's angles are 0."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim ({head_dim}) divisible by 4")
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 4, dtype=torch.float64) * 4 / head_dim)  # (D/4,)
    idx = torch.arange(grid_size * grid_size)
    col, row = (idx % grid_size + 1).double(), (idx // grid_size + 1).double()  # (N,) each
    angles = torch.cat([col[:, None] * freqs, row[:, None] * freqs], dim=-1)   # (N, D/2)
    return torch.cat([angles, angles.new_zeros(1, head_dim // 2)])              # (N + 1, D/2)


def vision_freqs_cis(grid_size: int, head_dim: int, theta: float) -> torch.Tensor:
    """The rotations cos + i sin of `vision_rope_angles`: (N + 1, D/2) complex64."""
    angles = vision_rope_angles(grid_size, head_dim, theta)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def merge_image_features(h: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Write the image features over the token embeddings at the image positions, in order.
    h (B, T, C), image_mask (B, T) bool, features (n, C) with n = image_mask.sum() -> (B, T, C)."""
    n = int(image_mask.sum())
    if features.shape != (n, h.shape[-1]):
        raise ValueError(f"{n} image positions need features of shape ({n}, {h.shape[-1]}); "
                         f"got {tuple(features.shape)}")
    out = h.clone()
    out[image_mask] = features.to(h.dtype)  # row-major order: batch row, then position
    return out


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2D RoPE."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        C, self.n_heads = config.d_model, config.n_heads
        self.Wq, self.Wk = nn.Linear(C, C), nn.Linear(C, C)
        self.Wv, self.Wo = nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x (I, N+1, Cv), freqs_cis (N+1, D/2) -> (I, N+1, Cv)."""
        I, T, C = x.shape
        q = self.Wq(x).view(I, T, self.n_heads, -1)  # (I, T, H, D)
        k = self.Wk(x).view(I, T, self.n_heads, -1)
        v = self.Wv(x).view(I, T, self.n_heads, -1)
        q, k = apply_rope(q, k, freqs_cis)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (I, H, T, D), no mask
        return self.Wo(out.transpose(1, 2).reshape(I, T, C))


class VisionLayer(nn.Module):
    """Pre-norm ViT block: x + attention(LayerNorm(x)), then + MLP(LayerNorm(x)) with GELU."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attention = VisionAttention(config)
        self.ffn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.fc1 = nn.Linear(config.d_model, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.d_model)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs_cis)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))  # (I, N+1, Cv)


class PixelShuffleAdapter(nn.Module):
    """Pixel shuffle, then a two-layer MLP with GELU after each layer (no biases)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.ratio = config.pixel_shuffle_ratio
        self.fc1 = nn.Linear(config.shuffled_dim, config.projector_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_dim, config.projector_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(I, N, Cv) -> (I, N r^2, P)."""
        return F.gelu(self.fc2(F.gelu(self.fc1(pixel_shuffle(x, self.ratio)))))


class VisionEncoder(nn.Module):
    """Images (I, 3, H, W) -> features (I, tokens_per_image, d_model) ready to merge into the text."""

    def __init__(self, config: VisionConfig, d_model: int) -> None:
        super().__init__()
        self.config = config
        Cv, N = config.d_model, config.grid_size ** 2
        self.patch_emb = nn.Linear(config.n_channels * config.patch_size ** 2, Cv, bias=False)
        scale = Cv ** -0.5
        self.class_emb = nn.Parameter(scale * torch.randn(Cv))        # (Cv,)
        self.pos_emb = nn.Parameter(scale * torch.randn(N + 1, Cv))   # (N+1, Cv): patches, then the class token
        self.norm_pre = nn.LayerNorm(Cv, eps=config.norm_eps)
        self.encoder = nn.ModuleList(VisionLayer(config) for _ in range(config.n_layers))
        self.norm_post = nn.LayerNorm(Cv, eps=config.norm_eps)
        self.adapter = PixelShuffleAdapter(config)
        self.projector = nn.Linear(config.projector_dim, d_model, bias=False)
        self._freqs_cis: dict[torch.device, torch.Tensor] = {}

    def freqs_cis(self, device: torch.device) -> torch.Tensor:
        if device not in self._freqs_cis:
            c = self.config
            self._freqs_cis[device] = vision_freqs_cis(c.grid_size, c.d_model // c.n_heads, c.rope_theta).to(device)
        return self._freqs_cis[device]

    def check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (I, {c.n_channels}, {c.image_size}, {c.image_size}) "
                             f"with values scaled as in training; got "
                             f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
        expected = (c.n_channels, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (I, {', '.join(map(str, expected))}) (images, channels, "
                             f"height, width); got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(I, 3, S, S) -> (I, tokens_per_image, C)."""
        self.check_images(images)
        x = self.patch_emb(patchify(images.to(self.patch_emb.weight.dtype), self.config.patch_size))  # (I, N, Cv)
        cls = self.class_emb.expand(x.shape[0], 1, -1)      # (I, 1, Cv)
        x = self.norm_pre(torch.cat([x, cls], dim=1) + self.pos_emb)  # (I, N+1, Cv)
        freqs = self.freqs_cis(x.device)
        for layer in self.encoder:
            x = layer(x, freqs)
        x = self.norm_post(x)[:, :-1]                        # (I, N, Cv): drop the class token
        return self.projector(self.adapter(x))               # (I, N r^2, P) -> (I, N r^2, C)
