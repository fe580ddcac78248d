"""3-axis rotary position embedding of Wan2.1: interleaved pairs, tables built in fp64
(rope_params / rope_apply in Wan2.1's wan/modules/model.py).

The head dimension is split t:h:w = d - 4*(d//6) : 2*(d//6) : 2*(d//6) real dims; each axis has its own
frequencies theta^(-2j/dim_axis). Positions start at 0 on every axis and the spatial ones restart in each
frame, so a temporal offset is all that window-relative (cache) positions need.

The angles are computed in fp64 (as the original); the rotation itself is applied in fp32 from cos/sin tables
rounded once to fp32 (`rope_cos_sin`), which differs from an fp64 rotation by fp32 rounding only (~1e-7
relative) and avoids two fp64 casts of every query and key per call.
"""
import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_tables(head_dim: int, max_positions: int, theta: float = 10000.0) -> list[torch.Tensor]:
    """One complex128 table [max_positions, dim_axis // 2] per axis (t, h, w)."""
    tables = []
    for dim in axis_dims(head_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), omega)
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return tables


def rope_grid(tables: list[torch.Tensor], frames: int, height: int, width: int, frame_offset: int = 0):
    """Rotations for tokens in (f, h, w) row-major order: complex128 [frames*height*width, head_dim // 2]."""
    t_tab, h_tab, w_tab = tables
    if frame_offset < 0 or frame_offset + frames > t_tab.shape[0] or max(height, width) > h_tab.shape[0]:
        raise ValueError(f"RoPE positions out of range: frames {frame_offset}..{frame_offset + frames - 1}, "
                         f"grid {height}x{width}, table length {t_tab.shape[0]}")
    shape = (frames, height, width, -1)
    grid = torch.cat([
        t_tab[frame_offset:frame_offset + frames].view(frames, 1, 1, -1).expand(shape),
        h_tab[:height].view(1, height, 1, -1).expand(shape),
        w_tab[:width].view(1, 1, width, -1).expand(shape),
    ], dim=-1)
    return grid.reshape(frames * height * width, -1)


def rope_cos_sin(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables [1, N, 1, D] for `apply_rope`: cos repeated over each pair, and sin signed (-sin, +sin), so
    that rotating pairs (a, b) -> (a cos - b sin, b cos + a sin) is x * cos + swap_pairs(x) * sin."""
    n = grid.shape[0]
    cos = grid.real.repeat_interleave(2, dim=-1)
    sin = torch.stack([-grid.imag, grid.imag], dim=-1).flatten(-2)
    return tuple(t.to(torch.float32).view(1, n, 1, -1) for t in (cos, sin))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, N, H, D] by `rope_cos_sin` tables (pairs (x[2i], x[2i+1])), in fp32, returned in x's dtype."""
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    out = xf * cos + swapped * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)
