"""`TlamaConfig`: every hyperparameter of the model in one validated, immutable dataclass.

Field names follow Llama (and the seed `001_*.txt`): `d_model n_layers n_heads n_kv_heads vocab_size
max_seq_len max_batch_size rope_theta norm_eps multiple_of ffn_dim_multiplier`. Derived values
(`head_dim`, `n_rep`, `ffn_dim`) are properties, so they can never disagree with the fields.
A config is never mutated: make a changed copy with `config.replace(n_layers=4)`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

ATTN_BACKENDS = ("sdpa", "naive", "flash", "triton")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3.1-style RoPE frequency scaling for context extension (see `rope.scale_freqs`).

    Wavelengths longer than `original_max_seq_len / low_freq_factor` are slowed down by `factor`,
    those shorter than `original_max_seq_len / high_freq_factor` are kept, and the band between
    is interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor ({self.factor}) must be >= 1.0")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                f"rope_scaling needs 0 < low_freq_factor ({self.low_freq_factor}) "
                f"< high_freq_factor ({self.high_freq_factor})")
        if self.original_max_seq_len <= 0:
            raise ValueError(f"rope_scaling.original_max_seq_len ({self.original_max_seq_len}) must be positive")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """The image encoder of a vision-language model (Llama 4's, see `vision.py`): a ViT over
    `patch_size` x `patch_size` patches of a square `image_size` image, then pixel shuffle (each
    2 x 2 group of patches -> one token when `pixel_shuffle_ratio` is 0.5) and an MLP adapter of width
    `projector_dim`; the model projects that into its `d_model`."""

    image_size: int = 448
    patch_size: int = 14
    n_channels: int = 3
    d_model: int = 768
    n_layers: int = 34
    n_heads: int = 16
    ffn_dim: int = 5632                    # hidden size of each encoder layer's GELU MLP
    rope_theta: float = 10000.0            # base of the 2D RoPE over the patch grid
    pixel_shuffle_ratio: float = 0.5       # side of the token grid / side of the patch grid
    projector_dim: int = 4096              # width of the pixel-shuffle MLP adapter's output
    norm_eps: float = 1e-5                 # LayerNorm epsilon

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "n_channels", "d_model", "n_layers", "n_heads", "ffn_dim",
                     "projector_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision.{name} ({value!r}) must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size ({self.image_size}) must be a multiple of "
                             f"vision.patch_size ({self.patch_size})")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 4:
            raise ValueError(f"vision.d_model ({self.d_model}) / vision.n_heads ({self.n_heads}) must be a "
                             "multiple of 4 (2D RoPE rotates pairs along x and along y)")
        if not 0 < self.pixel_shuffle_ratio <= 1:
            raise ValueError(f"vision.pixel_shuffle_ratio ({self.pixel_shuffle_ratio}) must be in (0, 1]")
        s = round(1 / self.pixel_shuffle_ratio)
        if abs(s * self.pixel_shuffle_ratio - 1) > 1e-9 or self.grid_size % s:
            raise ValueError(f"vision.pixel_shuffle_ratio ({self.pixel_shuffle_ratio}) must be 1/s for a whole s "
                             f"that divides the {self.grid_size} x {self.grid_size} patch grid")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(f"vision.rope_theta ({self.rope_theta}) and vision.norm_eps ({self.norm_eps}) "
                             "must be positive")

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Image tokens in the text after pixel shuffle: (grid_size * ratio) ** 2."""
        return (self.grid_size // round(1 / self.pixel_shuffle_ratio)) ** 2

    @property
    def shuffled_dim(self) -> int:
        """Width of one token after pixel shuffle: d_model / ratio ** 2."""
        return self.d_model * round(1 / self.pixel_shuffle_ratio) ** 2


@dataclass(frozen=True, kw_only=True)
class TlamaConfig:
    """Hyperparameters of a `Transformer`. Validated at construction; see `PRESETS` for named sizes."""

    # --- shape (seed 001) ---
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None          # None: = n_heads (MHA); 1: MQA; in between: GQA
    attn_head_dim: int | None = None       # width of one head; None: d_model // n_heads (Qwen3 sets it apart)
    multiple_of: int = 256                 # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None      # exact SwiGLU hidden size (overrides the rule; used for HF models)
    norm_eps: float = 1e-5                 # Llama's value; RMSNorm(dim) alone defaults to 1e-6 (seed 001), see norm.py
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    max_batch_size: int = 32               # rows of the preallocated KV cache
    weight_init: tuple[float, float] = (0.02, 0.0)  # (std, mean) of the normal init
    use_parallel: bool = True              # shard linears over a tensor-parallel group, if one is set up
    kv_cache: bool = True                  # use the KV cache in eval-mode inference (never in training)
    eos_token_id: int | tuple[int, ...] | None = None  # generate() stops at these by default (HF's name)
    # --- training-time extras ---
    dropout: float = 0.0
    tie_embeddings: bool = False
    attn_backend: Literal["sdpa", "naive", "flash", "triton"] = "sdpa"  # triton: triton_flash.py
    flash_block_size: int | None = None    # tile size of the flash backend (None: flash.default_blocks)
    blockwise_chunk_size: int | None = None  # chunk the FFN, LM head and loss over tokens (seed 002)
    # --- modern variants (seed 003) ---
    rope_scaling: RopeScaling | None = None
    xpos_scale_base: int | None = None     # xPos decay on top of RoPE (seed 000); None: plain RoPE
    qk_norm: bool = False                  # RMSNorm on each head's q and k before RoPE (Qwen3)
    sliding_window: int | None = None      # each query sees at most this many keys (itself included)
    attention_chunk_size: int | None = None  # chunked local attention on RoPE layers (Llama 4)
    nope_layer_interval: int | None = None   # every Nth layer uses no positional encoding (NoPE)
    qk_l2_norm: bool = False               # Llama 4: q, k divided by their RMS (no weights) after RoPE, RoPE layers
    attn_temperature_floor: int | None = None  # Llama 4 NoPE layers: q *= 1 + scale * log(1 + (pos + 1) // floor)
    attn_temperature_scale: float = 0.1        # the `scale` above (attn_scale in Llama 4's config)
    parallel_block: bool = False           # PaLM: x + attn(norm(x)) + ffn(norm(x)) with one shared norm
    # --- mixture of experts ---
    n_experts: int | None = None           # None: dense FFN everywhere
    n_experts_per_tok: int = 2             # top-k
    moe_hidden_dim: int | None = None      # expert hidden size (default: the dense rule)
    moe_layer_interval: int = 1            # layer i is MoE when (i + 1) % interval == 0
    moe_shared_expert: bool = False        # a dense expert every token also goes through
    moe_norm_topk_prob: bool = True        # renormalise the top-k router weights to sum to 1 (Mixtral)
    moe_router: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid: Llama 4 (scores scale the expert input)
    moe_aux_loss_coef: float = 0.01        # weight of the load-balancing loss added to the LM loss
    # --- vision input (Llama 4) ---
    vision: VisionConfig | None = None     # None: a text-only model
    image_token_id: int | None = None      # positions holding this id receive the image features

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        object.__setattr__(self, "weight_init", tuple(float(v) for v in self.weight_init))
        if isinstance(self.eos_token_id, (list, tuple)):  # a JSON checkpoint gives a list
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "multiple_of", "max_seq_len",
                     "max_batch_size", "moe_layer_interval", "n_experts_per_tok"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("n_kv_heads", "attn_head_dim", "ffn_hidden_dim", "blockwise_chunk_size", "sliding_window",
                     "attention_chunk_size", "nope_layer_interval", "attn_temperature_floor", "xpos_scale_base", "n_experts",
                     "moe_hidden_dim", "flash_block_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{name} ({value!r}) must be a positive integer or None")
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE: pick d_model / n_heads "
                             "(or attn_head_dim) even")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier ({self.ffn_dim_multiplier}) must be positive or None")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps ({self.norm_eps}) must be positive")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta ({self.rope_theta}) must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout ({self.dropout}) must be in [0, 1)")
        if len(self.weight_init) != 2 or not self.weight_init[0] > 0:
            raise ValueError(f"weight_init ({self.weight_init}) must be (std, mean) with std > 0")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend ({self.attn_backend!r}) must be one of {ATTN_BACKENDS}")
        if self.sliding_window is not None and self.attention_chunk_size is not None:
            raise ValueError("sliding_window and attention_chunk_size are mutually exclusive; set one of them")
        if self.attn_backend in ("flash", "triton") and (self.sliding_window or self.attention_chunk_size
                                                          or self.dropout):
            raise ValueError(f"attn_backend={self.attn_backend!r} supports plain causal attention without dropout; "
                             "unset sliding_window/attention_chunk_size/dropout or use attn_backend='sdpa'")
        if self.n_experts is not None and self.n_experts_per_tok > self.n_experts:
            raise ValueError(f"n_experts_per_tok ({self.n_experts_per_tok}) must be <= n_experts ({self.n_experts})")
        if self.moe_aux_loss_coef < 0:
            raise ValueError(f"moe_aux_loss_coef ({self.moe_aux_loss_coef}) must be >= 0")
        if self.moe_router not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router ({self.moe_router!r}) must be 'softmax' or 'sigmoid'")
        if self.qk_norm and self.qk_l2_norm:
            raise ValueError("qk_norm (RMSNorm with weights, before RoPE) and qk_l2_norm (without weights, after "
                             "RoPE) are alternatives; set one of them")
        if self.attn_temperature_floor is not None and self.nope_layer_interval is None:
            raise ValueError(f"attn_temperature_floor ({self.attn_temperature_floor}) acts on NoPE layers only; "
                             "set nope_layer_interval too")
        if (self.vision is None) != (self.image_token_id is None):
            raise ValueError(f"vision and image_token_id ({self.image_token_id}) go together: a vision model needs "
                             "the id of its image token, and a text-only model has none")
        if self.image_token_id is not None and not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id ({self.image_token_id}) must be in [0, {self.vocab_size}) (vocab_size)")
        for t in () if self.eos_token_id is None else (
                self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"eos_token_id ({self.eos_token_id!r}) must be None, a token id or a tuple of "
                                 f"token ids in [0, {self.vocab_size}) (vocab_size)")

    # --- derived values ---
    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_heads, or n_heads when it is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim if self.attn_head_dim is not None else self.d_model // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.kv_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden size of the dense SwiGLU (the seed's rule applied to 4 * d_model)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return ffn_hidden_size(4 * self.d_model, self.multiple_of, self.ffn_dim_multiplier)

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.n_experts is not None and (layer_id + 1) % self.moe_layer_interval == 0

    def is_nope_layer(self, layer_id: int) -> bool:
        return self.nope_layer_interval is not None and (layer_id + 1) % self.nope_layer_interval == 0

    # --- copies and serialisation ---
    def replace(self, **changes: Any) -> "TlamaConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TlamaConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TlamaConfig":
        """A named preset (see `PRESETS`), optionally with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def ffn_hidden_size(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Llama's SwiGLU sizing: 2/3 of `hidden_dim` (SwiGLU has three matrices, not two, so this keeps
    the parameter count of a 4x GELU MLP), times the multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# Named sizes. `tiny` is what tests and notebooks use; `char-cpu` is the default of
# `python -m tlama_mini train`; `gpt2-small` has GPT-2 small's shape (124M with its vocabulary).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                 max_seq_len=128, max_batch_size=8),
    # char-cpu: chosen by measurement for a 2-core CPU and a 1-5 minute budget (see trainer.TRAIN_PRESETS)
    "char-cpu": dict(vocab_size=65, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, multiple_of=32,
                     max_seq_len=128, max_batch_size=16, tie_embeddings=True),
    "char-gpu": dict(vocab_size=65, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, multiple_of=64,
                     max_seq_len=256, max_batch_size=64, dropout=0.2),
    "moe-tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16,
                     max_seq_len=128, max_batch_size=8, n_experts=4, n_experts_per_tok=2),
    "gpt2-small": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, multiple_of=256,
                       max_seq_len=1024, max_batch_size=8),
    "llama-1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                     ffn_hidden_dim=8192, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192,
                     max_batch_size=4, tie_embeddings=True,
                     rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_seq_len=8192)),
}
