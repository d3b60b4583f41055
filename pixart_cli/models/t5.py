"""T5's encoder stack, as transformers' ``T5EncoderModel`` computes it, without importing transformers' models.

Importing ``transformers.T5EncoderModel`` loads transformers' whole modeling stack (torch.distributed.tensor,
sympy, torch._dynamo through its masking utilities, generation utilities): seconds of an encode process
that runs 24 identical blocks (issue 10). This module holds only those blocks, with the same module and
parameter names as ``T5EncoderModel``, so it reads the same safetensors files (``streaming.py`` drives it
block by block), and the same arithmetic as transformers 5's T5 under its default SDPA attention:
- RMS norm accumulated in fp32, cast back to half precision before the weight;
- attention without scaling, the relative position bias of block 0 shared by all blocks, padding masked with
  the dtype's minimum (no mask at all when nothing is padded, as transformers passes none);
- the feed-forward's ``wo`` kept in fp32 under fp16 (``_keep_in_fp32_modules``), its input cast to it;
- fp16 activations clamped after attention and after the feed-forward.
tests/test_lean.py compares it with ``T5EncoderModel`` on the same weights; the quantized (bitsandbytes) plans
still use ``T5EncoderModel`` itself.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

# T5Config's defaults, for keys a config.json leaves out.
DEFAULTS = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
KEEP_IN_FP32 = ["wo"]  # T5PreTrainedModel._keep_in_fp32_modules


def t5_config(config: dict) -> SimpleNamespace:
    """The fields of a T5 config.json the encoder uses, with T5Config's defaults and its activation naming
    (``gated-gelu`` is gated ``gelu_new``)."""
    values = {key: config.get(key, default) for key, default in DEFAULTS.items()}
    if config.get("num_layers") is None and "num_hidden_layers" in config:
        values["num_layers"] = config["num_hidden_layers"]
    if not isinstance(values["feed_forward_proj"], str):
        raise ValueError(f"feed_forward_proj {values['feed_forward_proj']!r} is not a T5 activation")
    projection = values["feed_forward_proj"].split("-")
    if len(projection) > 2 or (len(projection) == 2 and projection[0] != "gated"):
        raise ValueError(f"feed_forward_proj {values['feed_forward_proj']!r} is not a T5 activation")
    values["is_gated_act"] = projection[0] == "gated"
    values["dense_act_fn"] = "gelu_new" if values["feed_forward_proj"] == "gated-gelu" else projection[-1]
    if values["dense_act_fn"] not in _ACTIVATIONS:
        raise ValueError(f"T5 activation {values['dense_act_fn']!r} is not supported")
    return SimpleNamespace(**values)


def _gelu_new(x):
    import torch

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _activation(name: str):
    import torch

    return {
        "gelu_new": _gelu_new,
        "relu": torch.nn.functional.relu,
        "gelu": torch.nn.functional.gelu,
        "silu": torch.nn.functional.silu,
    }[name]


_ACTIVATIONS = ("gelu_new", "relu", "gelu", "silu")


def t5_encoder(config: dict):
    """A ``T5EncoderModel``-shaped encoder for a text_encoder/config.json, its weights uninitialised: build it
    on the meta device and load them, as streaming.py does."""
    return _classes().T5Encoder(t5_config(config))


@functools.cache
def _classes():
    """The modules, defined on first use: torch is imported only when a stage runs."""
    import torch
    from torch import nn

    def embedding(count, size):
        # Uninitialised (weights are always loaded): nn.Embedding's normal_ init on the meta device goes
        # through torch._refs, which imports torch._dynamo.
        return nn.Embedding(count, size, _weight=torch.empty((count, size)))

    def clamp_fp16(hidden_states):
        if hidden_states.dtype == torch.float16:
            clamp_value = torch.where(
                torch.isinf(hidden_states).any(),
                torch.finfo(hidden_states.dtype).max - 1000,
                torch.finfo(hidden_states.dtype).max,
            )
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states

    class LayerNorm(nn.Module):
        def __init__(self, size, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))
            self.variance_epsilon = eps

        def forward(self, hidden_states):
            variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
            if self.weight.dtype in (torch.float16, torch.bfloat16):
                hidden_states = hidden_states.to(self.weight.dtype)
            return self.weight * hidden_states

    class Attention(nn.Module):
        def __init__(self, config, has_relative_attention_bias):
            super().__init__()
            self.config = config
            inner = config.num_heads * config.d_kv
            self.q = nn.Linear(config.d_model, inner, bias=False)
            self.k = nn.Linear(config.d_model, inner, bias=False)
            self.v = nn.Linear(config.d_model, inner, bias=False)
            self.o = nn.Linear(inner, config.d_model, bias=False)
            if has_relative_attention_bias:
                self.relative_attention_bias = embedding(config.relative_attention_num_buckets, config.num_heads)

        def compute_bias(self, length, device):
            """[1, heads, length, length]: transformers' bidirectional bucketed relative position bias."""
            config = self.config
            context = torch.arange(length, dtype=torch.long, device=device)[:, None]
            memory = torch.arange(length, dtype=torch.long, device=device)[None, :]
            relative_position = memory - context
            num_buckets = config.relative_attention_num_buckets // 2
            buckets = (relative_position > 0).to(torch.long) * num_buckets
            relative_position = torch.abs(relative_position)
            max_exact = num_buckets // 2
            is_small = relative_position < max_exact
            if_large = max_exact + (
                torch.log(relative_position.float() / max_exact)
                / math.log(config.relative_attention_max_distance / max_exact)
                * (num_buckets - max_exact)
            ).to(torch.long)
            if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
            buckets = buckets + torch.where(is_small, relative_position, if_large)
            return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)

        def forward(self, hidden_states, mask, position_bias):
            input_shape = hidden_states.shape[:-1]
            shape = (*input_shape, -1, self.config.d_kv)
            query = self.q(hidden_states).view(shape).transpose(1, 2)
            key = self.k(hidden_states).view(shape).transpose(1, 2)
            value = self.v(hidden_states).view(shape).transpose(1, 2)
            if position_bias is None:
                if hasattr(self, "relative_attention_bias"):
                    position_bias = self.compute_bias(input_shape[1], query.device)
                else:
                    position_bias = torch.zeros(
                        (1, self.config.num_heads, input_shape[1], input_shape[1]),
                        device=query.device,
                        dtype=query.dtype,
                    )
            bias = position_bias if mask is None else torch.where(mask, position_bias, torch.finfo(key.dtype).min)
            output = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=bias.contiguous(), dropout_p=0.0, scale=1.0, is_causal=False
            )
            output = output.reshape(output.shape[0], -1, input_shape[1], value.shape[-1]).transpose(1, 2).contiguous()
            return self.o(output.reshape(*input_shape, -1).contiguous()), position_bias

    class SelfAttentionLayer(nn.Module):
        def __init__(self, config, has_relative_attention_bias):
            super().__init__()
            self.SelfAttention = Attention(config, has_relative_attention_bias)
            self.layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)

        def forward(self, hidden_states, mask, position_bias):
            output, position_bias = self.SelfAttention(self.layer_norm(hidden_states), mask, position_bias)
            return hidden_states + output, position_bias

    class DenseActDense(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.gated = config.is_gated_act
            if self.gated:
                self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
                self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
            else:
                self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
            self.act = _activation(config.dense_act_fn)

        def forward(self, hidden_states):
            if self.gated:
                hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
            else:
                hidden_states = self.act(self.wi(hidden_states))
            if hidden_states.dtype != self.wo.weight.dtype and self.wo.weight.dtype != torch.int8:
                hidden_states = hidden_states.to(self.wo.weight.dtype)
            return self.wo(hidden_states)

    class FeedForwardLayer(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.DenseReluDense = DenseActDense(config)
            self.layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)

        def forward(self, hidden_states):
            return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))

    class Block(nn.Module):
        def __init__(self, config, has_relative_attention_bias):
            super().__init__()
            self.layer = nn.ModuleList(
                [SelfAttentionLayer(config, has_relative_attention_bias), FeedForwardLayer(config)]
            )

        def forward(self, hidden_states, mask, position_bias):
            hidden_states, position_bias = self.layer[0](hidden_states, mask, position_bias)
            hidden_states = clamp_fp16(hidden_states)
            return clamp_fp16(self.layer[1](hidden_states)), position_bias

    class Stack(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.embed_tokens = embedding(config.vocab_size, config.d_model)
            self.block = nn.ModuleList([Block(config, i == 0) for i in range(config.num_layers)])
            self.final_layer_norm = LayerNorm(config.d_model, config.layer_norm_epsilon)

    class T5Encoder(nn.Module):
        """``T5EncoderModel(config)(input_ids, attention_mask)[0]``: the last hidden state [B, L, d_model]."""

        _keep_in_fp32_modules = KEEP_IN_FP32

        def __init__(self, config):
            super().__init__()
            self.config = config
            self.shared = embedding(config.vocab_size, config.d_model)
            self.encoder = Stack(config)
            self.encoder.embed_tokens.weight = self.shared.weight  # tied, as in T5EncoderModel

        @property
        def dtype(self):
            return self.shared.weight.dtype

        def forward(self, input_ids, attention_mask=None):
            hidden_states = self.encoder.embed_tokens(input_ids)
            # transformers passes SDPA no mask when nothing is padded, else a boolean one (True: attend)
            mask = None
            if attention_mask is not None and not attention_mask.all():
                mask = attention_mask[:, None, None, :].to(torch.bool)
            position_bias = None
            for block in self.encoder.block:
                hidden_states, position_bias = block(hidden_states, mask, position_bias)
            return (self.encoder.final_layer_norm(hidden_states),)

    return SimpleNamespace(T5Encoder=T5Encoder)
