"""Per-token activation quantization for the wire: 32/16-bit floats, 8-bit and packed 4-bit ints.

Each row (one token's hidden state) gets its own scale, absmax / qmax, so an outlier token does
not flatten the others. 4-bit values are packed two per byte (low nibble first). The packed form
is what `split.proto`'s QTensor carries; `unpack` checks every size against the header, so a
truncated or inconsistent payload raises `ValueError` instead of producing garbage.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quantize import quantize_rows

BITS = (32, 16, 8, 4)
ACT_BITS = (16, 8, 4)  # what a device may stream its activations at (32: gradients only)
_QMAX = {8: 127, 4: 7}
_FLOAT = {32: np.float32, 16: np.float16}


def payload_bytes(rows: int, cols: int, bits: int) -> int:
    """Bytes on the wire for a (rows, cols) tensor at `bits` (data + per-row scales)."""
    if bits in _FLOAT:
        return rows * cols * bits // 8
    return rows * ((cols * bits + 7) // 8) + 4 * rows


def quantize(x: torch.Tensor, bits: int) -> tuple[bytes, bytes]:
    """(data, scales) of a 2-D float tensor; scales empty for float formats."""
    if bits not in BITS:
        raise ValueError(f"activation bits must be one of {BITS}, got {bits}")
    x = x.detach().float()
    if bits in _FLOAT:
        return x.numpy().astype(_FLOAT[bits]).tobytes(), b""
    q, scale = quantize_rows(x, _QMAX[bits])
    scale = scale[:, 0]                                             # (rows,)
    if bits == 4:
        if q.shape[1] % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        u = (q & 0x0F).to(torch.uint8)                                  # two's complement nibble
        q = u[:, 0::2] | (u[:, 1::2] << 4)
    return q.numpy().tobytes(), scale.numpy().astype(np.float32).tobytes()


def dequantize(data: bytes, scales: bytes, rows: int, cols: int, bits: int) -> torch.Tensor:
    """The float32 (rows, cols) tensor; ValueError when the sizes do not match the header."""
    if bits not in BITS:
        raise ValueError(f"unsupported bits {bits}; expected one of {BITS}")
    if rows * cols > 1 << 31:
        raise ValueError(f"tensor of {rows} x {cols} is too large")
    if len(data) + len(scales) != payload_bytes(rows, cols, bits) or \
            (bits in _FLOAT and scales):
        raise ValueError(f"payload of {len(data)}+{len(scales)} bytes does not hold a "
                         f"{rows} x {cols} tensor at {bits} bits "
                         f"({payload_bytes(rows, cols, bits)} bytes expected)")
    if bits in _FLOAT:
        arr = np.frombuffer(data, dtype=_FLOAT[bits]).astype(np.float32)
        out = torch.from_numpy(arr.reshape(rows, cols))
    else:
        out = _dequantize_int(data, scales, rows, cols, bits)
    if not torch.isfinite(out).all():
        raise ValueError("payload holds non-finite values")
    return out


def _dequantize_int(data: bytes, scales: bytes, rows: int, cols: int, bits: int) -> torch.Tensor:
    scale = torch.from_numpy(np.frombuffer(scales, dtype=np.float32).copy())
    if bits == 8:
        q = torch.from_numpy(np.frombuffer(data, dtype=np.int8).copy()).reshape(rows, cols)
    else:
        u = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).reshape(rows, -1)
        nib = torch.stack([u & 0x0F, u >> 4], dim=2).reshape(rows, -1)[:, :cols].to(torch.int8)
        q = torch.where(nib > 7, nib - 16, nib)                         # sign-extend
    return q.float() * scale[:, None]


def roundtrip(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What the receiver sees of `x` (the device applies it too, so local inference with a
    trained side network matches what it was trained on)."""
    if bits == 32:
        return x
    data, scales = quantize(x.reshape(-1, x.shape[-1]), bits)
    out = dequantize(data, scales, x.numel() // x.shape[-1], x.shape[-1], bits)
    return out.reshape(x.shape).to(x.dtype)
