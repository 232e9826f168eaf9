"""Tiny random-weight models of every supported architecture (CPU, odd sizes)."""
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 37


def _configs():
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_layer=3, n_head=3, n_embd=21, vocab_size=VOCAB,
                                             n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0)),
        "llama-gqa": (LlamaForCausalLM, LlamaConfig(num_hidden_layers=3, num_attention_heads=4,
                                                    num_key_value_heads=2, hidden_size=24,
                                                    intermediate_size=37, vocab_size=VOCAB)),
        "mistral": (MistralForCausalLM, MistralConfig(num_hidden_layers=2, num_attention_heads=2,
                                                      num_key_value_heads=1, hidden_size=20,
                                                      intermediate_size=29, vocab_size=VOCAB)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=2, num_attention_heads=6,
                                                num_key_value_heads=2, hidden_size=36,
                                                intermediate_size=23, vocab_size=VOCAB)),
        "neox-parallel": (GPTNeoXForCausalLM, GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4,
                                                            hidden_size=32, intermediate_size=31,
                                                            vocab_size=VOCAB, rotary_pct=0.5,
                                                            use_parallel_residual=True)),
        "neox-sequential": (GPTNeoXForCausalLM, GPTNeoXConfig(num_hidden_layers=4, num_attention_heads=2,
                                                              hidden_size=20, intermediate_size=19,
                                                              vocab_size=VOCAB, rotary_pct=0.4,
                                                              use_parallel_residual=False)),
        # 8 + 8 + 8 + 1 = 25 readers per layer call: the Triton kernels' dot
        # path (16 or more readers) and the stack backward by columns (a
        # reader tile of 32 at least 3/4 full); the others take the vector path
        WIDE: (LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, num_attention_heads=8,
                                             num_key_value_heads=8, hidden_size=32,
                                             intermediate_size=27, vocab_size=VOCAB)),
    }


WIDE = "llama-wide"
ARCHITECTURES = [name for name in _configs() if name != WIDE]


def tiny_model(name: str, seed: int = 0, dtype=torch.float32):
    cls, config = _configs()[name]
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    # random weights away from init symmetry: perturb norms and biases too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def token_batch(batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, seq), generator=g),
            torch.randint(0, VOCAB, (batch, seq), generator=g))
