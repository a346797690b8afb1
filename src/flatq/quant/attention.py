"""QuantMultiheadAttention: nn.MultiheadAttention with its projections quantized.

nn.MultiheadAttention keeps its input projection as a raw `in_proj_weight` and hands both
projection weights to F.multi_head_attention_forward, so swapping its `out_proj` for a
QuantLinear would change nothing. This subclass computes the same attention with the
in-projection fake-quantized (weight per output row, query/key/value inputs per tensor) and
calls `out_proj` as a module, so a QuantLinear there quantizes the attention output too.
Parameter names (in_proj_weight, in_proj_bias, out_proj.*) are those of the float module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import _QuantLayer
from .quantizers import Quantizer


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A float mask to add to the attention logits (bool masks: True means masked out)."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


class QuantMultiheadAttention(_QuantLayer, nn.MultiheadAttention):
    """Multi-head attention whose in-projection and out_proj see fake-quantized operands."""

    kind = "multihead_attention"

    @staticmethod
    def unsupported(mha: nn.MultiheadAttention) -> str | None:
        """Why `mha` cannot be converted (None when it can): the options not reimplemented."""
        if not mha._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim/vdim differ from embed_dim)"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by QuantMultiheadAttention"
        return None

    @property
    def weight(self) -> Tensor:
        """The in-projection weight (query, key and value rows stacked), quantized per row."""
        return self.in_proj_weight

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, weight_quantizer: Quantizer,
                   input_quantizer: Quantizer) -> "QuantMultiheadAttention":
        layer = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
                    batch_first=mha.batch_first, device=mha.in_proj_weight.device,
                    dtype=mha.in_proj_weight.dtype)
        layer.in_proj_weight, layer.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        layer.out_proj = mha.out_proj
        layer._attach(weight_quantizer, input_quantizer)
        return layer.train(mha.training)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """q, k, v from the quantized in-projection (one matmul for self-attention)."""
        weight, bias = self.quantized_weight(), self.in_proj_bias
        if query is key and key is value:
            return F.linear(self.quantized_input(query), weight, bias).chunk(3, dim=-1)
        weights = weight.chunk(3)
        biases = bias.chunk(3) if bias is not None else (None,) * 3
        return tuple(F.linear(self.quantized_input(x), w, b)
                     for x, w, b in zip((query, key, value), weights, biases))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """nn.MultiheadAttention.forward's contract; `is_causal` is a hint that `attn_mask`
        is causal, as there (the mask itself is applied)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        unbatched = query.dim() == 2
        q, k, v = self._project(query, key, value)
        if unbatched:
            q, k, v = (t.unsqueeze(0) for t in (q, k, v))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        batch, target, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for t in (q, k, v))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(-1, self.num_heads, target, source) if mask.dim() == 3 else mask
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            weights = F.dropout(torch.softmax(logits if mask is None else logits + mask, dim=-1),
                                dropout)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights
