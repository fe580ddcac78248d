"""Scaled dot-product attention on [B, L, H, D] tensors; flash-attention kernels only where they apply."""
import torch
import torch.nn.functional as F


def _flash_kernel():
    """flash-attn 3, else 2, else None; imported lazily so that importing this module never needs CUDA."""
    try:
        from flash_attn_interface import flash_attn_func  # flash-attn 3
        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # flash-attn 2
        return flash_attn_func
    except ImportError:
        return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k/v [B, Lk, H, D]; mask (True = attend) broadcasts to
    [B, H, Lq, Lk]. Returns [B, Lq, H, D]."""
    if mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        kernel = _flash_kernel()
        if kernel is not None:
            out = kernel(q, k, v)
            return out[0] if isinstance(out, tuple) else out
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
