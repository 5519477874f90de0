"""tlama_mini.quant against gguf.quants (llama.cpp's Python reference), byte for byte.

Quantize: our bytes == gguf.quants.quantize's bytes on random tensors and edge cases (zeros, one
block, one sign only, ties in |x|, large magnitudes that overflow fp16, values on rounding
boundaries). Both compute in float32 with the same operations, so the comparison is exact; the
only platform-dependent step of the reference would be casting out-of-range floats to integers,
which both sides avoid (Q8_0's values are within +-127 by construction, Q4's are clamped to 0..15).
Dequantize: our float32 == gguf's float32 exactly, on quantized random data and on random bytes
(every bit pattern of the scales and nibbles, which real K-quant files use).
"""
import numpy as np
import pytest
import torch

from tlama_mini.quant import DEQUANTIZE_FORMATS, QUANTIZE_FORMATS, dequantize, quantize, row_bytes

gq = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as Q  # noqa: E402

# The reference warns (numpy overflow) on the "beyond fp16" case, where both sides overflow to inf alike
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def ref_quantize(w: torch.Tensor, fmt: str) -> np.ndarray:
    return gq.quantize(w.numpy().astype(np.float32), Q[fmt])


def ref_dequantize(raw: np.ndarray, fmt: str) -> np.ndarray:
    return gq.dequantize(raw, Q[fmt])


def _cases(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, blocks = int(torch.randint(1, 6, (), generator=g)), int(torch.randint(1, 6, (), generator=g))
    x = torch.randn(rows, 32 * blocks, generator=g) * float(torch.rand((), generator=g) * 3 + 0.01)
    tie = torch.randn(2, 32, generator=g)
    tie[:, 3], tie[:, 20] = 2.5, -2.5  # equal |x| of both signs: Q4_0 takes the first
    boundary = (torch.arange(64, dtype=torch.float32).reshape(2, 32) - 31.5) / 4  # halves after scaling
    return {
        "random": x,
        "one block": torch.randn(32, generator=g),
        "3-d": torch.randn(2, 3, 64, generator=g),
        "zeros": torch.zeros(3, 64),
        "zero block among others": torch.cat([torch.zeros(1, 32), torch.randn(1, 32, generator=g)], 1),
        "positive only": torch.rand(4, 32, generator=g) + 0.5,
        "negative only": -torch.rand(4, 32, generator=g) - 0.5,
        "constant": torch.full((2, 32), 0.7),
        "ties in |x|": tie,
        "rounding boundaries": boundary,
        "large": torch.randn(2, 32, generator=g) * 6e4,
        "beyond fp16": torch.randn(2, 32, generator=g) * 1e7,  # the fp16 scale overflows to inf in both
        "tiny": torch.randn(2, 32, generator=g) * 1e-7,
    }


@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
@pytest.mark.parametrize("seed", range(4))
def test_quantize_is_byte_identical_to_gguf(fmt, seed):
    for name, w in _cases(seed).items():
        ours = quantize(w, fmt)
        ref = ref_quantize(w, fmt)
        assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape, name
        assert np.array_equal(ours.numpy(), ref), f"{fmt}, {name}: bytes differ"
        back = dequantize(ours, fmt, w.shape)
        assert np.array_equal(back.numpy(), ref_dequantize(ref, fmt).reshape(w.shape), equal_nan=True), f"{fmt}, {name}"


@pytest.mark.parametrize("fmt", QUANTIZE_FORMATS)
def test_quantization_error_is_what_the_format_promises(fmt):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    back = dequantize(quantize(w, fmt), fmt, w.shape)
    blocks, err = w.reshape(-1, 32), (back - w).reshape(-1, 32).abs()
    step = {"Q8_0": blocks.abs().amax(1) / 127, "Q4_0": blocks.abs().amax(1) / 8,
            "Q4_1": (blocks.amax(1) - blocks.amin(1)) / 15}[fmt]
    # half a step from rounding (a whole one for Q4_0's clamped far end), plus the fp16 rounding of the
    # scale (relative 2^-11, times up to 127 steps) and of Q4_1's minimum
    bound = step * (1.0 if fmt == "Q4_0" else 0.5) + step * 127 * 2**-11 + 1e-3
    assert (err.amax(1) <= bound).all()
    assert (err.amax(1) > step * 0.3).all()  # and not trivially small: the bound is tight


@pytest.mark.parametrize("fmt", DEQUANTIZE_FORMATS)
@pytest.mark.parametrize("seed", range(3))
def test_dequantize_random_bytes_equals_gguf(fmt, seed):
    g = torch.Generator().manual_seed(seed)
    nbytes = row_bytes(512, fmt)
    raw = torch.randint(0, 256, (3, nbytes), dtype=torch.uint8, generator=g)
    if fmt in ("F16", "F32"):  # keep NaN patterns out: NaN != NaN
        raw = quantize_plain(torch.randn(3, 512, generator=g), fmt)
    else:  # fp16 scales: random finite values, not NaN/inf bit patterns
        raw = _finite_fp16_scales(raw, fmt, g)
    ours = dequantize(raw, fmt, (3, 512)).numpy()
    ref = ref_dequantize(raw.numpy(), fmt)
    assert ours.shape == ref.shape and np.array_equal(ours, ref)


def quantize_plain(w: torch.Tensor, fmt: str) -> torch.Tensor:
    dt = torch.float16 if fmt == "F16" else torch.float32
    return w.to(dt).contiguous().view(torch.uint8).reshape(w.shape[0], -1)


def _finite_fp16_scales(raw: torch.Tensor, fmt: str, g: torch.Generator) -> torch.Tensor:
    """Overwrite the fp16 fields of every block with random finite scales."""
    nbytes, _ = {"Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32), "Q4_K": (144, 256), "Q6_K": (210, 256)}[fmt]
    offsets = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[fmt]
    b = raw.reshape(-1, nbytes).clone()
    for off in offsets:
        vals = (torch.randn(b.shape[0], generator=g) * 0.05).to(torch.float16)
        b[:, off:off + 2] = vals.view(torch.uint8).reshape(-1, 2)
    return b.reshape(raw.shape)


def test_nibble_order_low_then_high():
    # Q4_1 of 0..31 / 31: q_j = j/2-ish rising; element 1 sits in byte 1's low nibble, element 16 in byte 0's high
    w = torch.arange(32, dtype=torch.float32)[None] / 31 * 15
    raw = quantize(w, "Q4_1")[0]
    q = raw[4:]
    assert int(q[0] & 0x0F) == 0 and int(q[0] >> 4) == 8 and int(q[15] >> 4) == 15


@pytest.mark.parametrize("call, message", [
    (lambda: quantize(torch.randn(4, 30), "Q8_0"), r"multiple of 32"),
    (lambda: quantize(torch.randn(32), "Q4_K"), r"cannot quantize to 'Q4_K': supported formats are Q8_0, Q4_0, Q4_1"),
    (lambda: quantize(torch.tensor([float("nan")] * 32), "Q8_0"), r"inf or NaN"),
    (lambda: dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,)), r"takes 34 bytes, got 33"),
    (lambda: dequantize(torch.zeros(34, dtype=torch.uint8), "IQ2_XS", (32,)), r"supported formats are F32, F16, Q8_0"),
    (lambda: dequantize(torch.zeros(34), "Q8_0", (32,)), r"torch.uint8"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
