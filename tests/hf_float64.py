"""Run Hugging Face models truly in float64.

After `model.double()`, Llama, Mistral and Qwen2's RMSNorm still compute in
float32, the eager softmax casts to float32, and the rotary cos/sin are built
in float32 (about 2e-7 of error, and NaN for left padding in float64). Inside
`hf_in_float64()` those three compute the same formulas in float64, so that
float64 comparisons can be tight.
"""
import contextlib
from unittest import mock

import torch

F64 = torch.float64


def _softmax64(orig):
    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == F64:
            return orig(input, dim=dim)
        return orig(input, dim=dim, dtype=dtype)
    return softmax


def _rms_norm64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary64(self, x, position_ids):
    # Hugging Face's default frequencies, in float64. `dim` is the rotary
    # dimension; when it is odd (GPT-NeoX head 6 * rotary_pct 0.5 = 3) there
    # are ceil(dim / 2) frequencies and 2 * ceil(dim / 2) features rotate.
    cfg = self.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if cfg.model_type == "gpt_neox":
        dim = int(dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=F64) / dim)
    assert torch.allclose(inv_freq, self.inv_freq.to(F64), rtol=1e-6), "rotary frequencies differ"
    freqs = position_ids[..., None].to(F64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@contextlib.contextmanager
def hf_in_float64():
    """Remove the float32 rounding inside Hugging Face's float64 forward pass."""
    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "softmax",
                                              _softmax64(torch.nn.functional.softmax)))
        for cls in (modeling_llama.LlamaRMSNorm, modeling_mistral.MistralRMSNorm, modeling_qwen2.Qwen2RMSNorm):
            stack.enter_context(mock.patch.object(cls, "forward", _rms_norm64))
        for cls in (modeling_llama.LlamaRotaryEmbedding, modeling_mistral.MistralRotaryEmbedding,
                    modeling_qwen2.Qwen2RotaryEmbedding, modeling_gpt_neox.GPTNeoXRotaryEmbedding):
            stack.enter_context(mock.patch.object(cls, "forward", _rotary64))
        yield
