"""Block quantization as GGUF (llama.cpp) stores weights, in plain torch.

A row of weights is cut into blocks of 32 numbers; each block keeps one or two fp16 constants and
small integers, so the file holds 8.5 (Q8_0), 4.5 (Q4_0) or 5 (Q4_1) bits per weight instead of 32:

    Q8_0  [d: fp16][q: 32 x int8]                 x = d * q,        d = absmax / 127,  q = round(x / d)
    Q4_0  [d: fp16][q: 16 bytes, 32 nibbles]      x = d * (q - 8),  d = -(signed absmax) / 8
    Q4_1  [d: fp16][m: fp16][q: 16 bytes]         x = d * q + m,    d = (max - min) / 15, m = min

The 4-bit formats pack block element j (j < 16) in the LOW nibble of byte j and element j + 16 in the
HIGH nibble of the same byte (not neighbours in one byte). The "K-quants" (Q4_K, Q6_K) group 8 or 16
blocks into super-blocks of 256 whose per-block scales are themselves quantized (6 or 8 bits) against
an fp16 super-scale; only their dequantization is here (what loading a downloaded Q4_K_M file needs).

Every function is checked byte for byte against `gguf.quants` (llama.cpp's Python reference) in
tests/test_quant.py. The rounding is the reference's, on float32: Q8_0 rounds half away from zero
(C's roundf, written floor(a) + floor(2 (a - floor(a))) to avoid the error of a + 0.5), Q4_0/Q4_1
truncate x / d + 8.5 (resp. + 0.5), then clamp to 0..15.
Legend: N blocks, R rows, n elements per row.
"""
from __future__ import annotations

import math

import torch

QK = 32     # elements per block of the simple formats
QK_K = 256  # elements per super-block of the K-quants

# bytes per block and elements per block
BLOCK = {"F32": (4, 1), "F16": (2, 1), "Q8_0": (2 + QK, QK), "Q4_0": (2 + QK // 2, QK),
         "Q4_1": (4 + QK // 2, QK), "Q4_K": (2 + 2 + 12 + QK_K // 2, QK_K),
         "Q6_K": (QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, QK_K)}
QUANTIZE_FORMATS = ("Q8_0", "Q4_0", "Q4_1")
DEQUANTIZE_FORMATS = tuple(BLOCK)


def _check_format(fmt: str, allowed: tuple[str, ...], what: str) -> None:
    if fmt not in allowed:
        raise ValueError(f"cannot {what} {fmt!r}: supported formats are {', '.join(allowed)}")


def row_bytes(n: int, fmt: str) -> int:
    """Bytes that one row of n elements takes in format fmt."""
    _check_format(fmt, DEQUANTIZE_FORMATS, "size")
    nbytes, per = BLOCK[fmt]
    if n % per:
        raise ValueError(f"{fmt} stores rows in blocks of {per} elements; a row of {n} is not a multiple of {per}")
    return n // per * nbytes


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (N, 1) -> its fp16 bit pattern as bytes (N, 2), little-endian (as GGUF stores it)."""
    return x.to(torch.float16).view(torch.uint8).reshape(x.shape[0], 2)


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """bytes (N, 2) -> float32 (N, 1)."""
    return raw.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, exactly as ggml's reference (see the module docstring)."""
    a = v.abs()
    fl = torch.floor(a)
    return torch.sign(v) * (fl + torch.floor(2 * (a - fl)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d == 0 (an all-zero block quantizes to zeros, not NaN)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(d), 1 / safe)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) values 0..15 -> (N, 16) bytes: element j low nibble, element j + 16 high nibble."""
    return q[:, :16] | (q[:, 16:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16 * k) bytes -> (N, 32 * k): per 16-byte group, the 16 low nibbles then the 16 high ones."""
    N = qs.shape[0]
    g = qs.reshape(N, -1, 1, 16)                                       # (N, k, 1, 16)
    q = torch.cat([g & 0x0F, g >> 4], dim=2)                           # (N, k, 2, 16)
    return q.reshape(N, -1)


def quantize(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w (..., n) float -> uint8 (..., bytes per row): the GGUF blocks of each row (n % 32 == 0)."""
    _check_format(fmt, QUANTIZE_FORMATS, "quantize to")
    if w.ndim == 0 or w.shape[-1] % QK:
        raise ValueError(f"{fmt} quantizes rows in blocks of {QK}; the last dimension of shape {tuple(w.shape)} "
                         f"must be a multiple of {QK}")
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a tensor with inf or NaN")
    x = w.detach().to(torch.float32).reshape(-1, QK)                   # (N, 32)
    if fmt == "Q8_0":
        d = x.abs().amax(dim=1, keepdim=True) / 127                    # (N, 1)
        q = _roundf(x * _inverse(d)).to(torch.int8).view(torch.uint8)  # (N, 32)
        out = torch.cat([_fp16_bytes(d), q], dim=1)                    # (N, 34)
    elif fmt == "Q4_0":
        imax = x.abs().argmax(dim=1, keepdim=True)                     # the first largest |x|
        d = x.gather(1, imax) / -8                                     # signed: that value maps to q = 0
        q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)     # (N, 18)
    else:  # Q4_1
        mx, mn = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
        d = (mx - mn) / 15
        q = torch.trunc((x - mn) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_fp16_bytes(d), _fp16_bytes(mn), _pack_nibbles(q)], dim=1)  # (N, 20)
    return out.reshape(*w.shape[:-1], -1)


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes (N, 12) -> 8 six-bit scales and 8 six-bit mins (N, 8) each. Bytes 0-3: scales 0-3
    (low 6 bits) and the high 2 bits of scales 4-7; bytes 4-7: mins likewise; bytes 8-11: the low
    4 bits of scale 4+i (low nibble) and of min 4+i (high nibble)."""
    s = s.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def dequantize(raw: torch.Tensor, fmt: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """GGUF bytes of a tensor (uint8, any shape holding them in order) -> float32 tensor of `shape`."""
    _check_format(fmt, DEQUANTIZE_FORMATS, "dequantize")
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    nbytes, per = BLOCK[fmt]
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw must be the file's bytes (torch.uint8), got {raw.dtype}")
    if not shape or shape[-1] % per:
        raise ValueError(f"{fmt} stores rows in blocks of {per}; the last dimension of {shape} is not a multiple")
    if raw.numel() != n // per * nbytes:
        raise ValueError(f"{fmt} tensor of shape {shape} takes {n // per * nbytes} bytes, got {raw.numel()}")
    b = raw.contiguous().reshape(-1, nbytes)                           # (N, bytes per block)
    if fmt == "F32":
        x = b.view(torch.float32)
    elif fmt == "F16":
        x = b.view(torch.float16).to(torch.float32)
    elif fmt == "Q8_0":
        x = b[:, 2:].view(torch.int8).to(torch.float32) * _fp16(b[:, :2])
    elif fmt == "Q4_0":
        q = _unpack_nibbles(b[:, 2:]).to(torch.int8) - 8
        x = _fp16(b[:, :2]) * q.to(torch.float32)
    elif fmt == "Q4_1":
        q = _unpack_nibbles(b[:, 4:]).to(torch.float32)
        x = _fp16(b[:, :2]) * q + _fp16(b[:, 2:4])
    elif fmt == "Q4_K":  # 8 blocks of 32: x = d * scale_j * q - dmin * min_j
        N = b.shape[0]
        sc, mn = _q4_k_scales(b[:, 4:16])
        d = (_fp16(b[:, 0:2]) * sc.to(torch.float32)).reshape(N, 8, 1)
        dm = (_fp16(b[:, 2:4]) * mn.to(torch.float32)).reshape(N, 8, 1)
        q = _unpack_nibbles_32(b[:, 16:]).reshape(N, 8, 32).to(torch.float32)
        x = (d * q - dm).reshape(N, QK_K)
    else:  # Q6_K: 16 blocks of 16, q = 4 low bits (ql) | 2 high bits (qh) << 4, minus 32
        N = b.shape[0]
        ql, qh = b[:, :128], b[:, 128:192]
        scales = b[:, 192:208].view(torch.int8).to(torch.float32)
        d = (_fp16(b[:, 208:210]) * scales).reshape(N, 16, 1)
        lo = _unpack_nibbles_32(ql, group=64)                          # (N, 256)
        g = qh.reshape(N, 2, 1, 32)                                    # (N, 2, 1, 32)
        hi = torch.cat([(g >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(N, -1)  # (N, 256)
        q = (lo | (hi << 4)).to(torch.int8) - 32
        x = (d * q.reshape(N, 16, 16).to(torch.float32)).reshape(N, QK_K)
    return x.reshape(shape)


def _unpack_nibbles_32(qs: torch.Tensor, group: int = 32) -> torch.Tensor:
    """(N, ...) bytes in groups of `group` -> per group, its low nibbles then its high nibbles (K-quants
    pack 32 (Q4_K) or 64 (Q6_K) bytes this way, unlike the 16 of Q4_0/Q4_1)."""
    N = qs.shape[0]
    g = qs.reshape(N, -1, 1, group)
    return torch.cat([g & 0x0F, g >> 4], dim=2).reshape(N, -1)
