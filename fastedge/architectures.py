"""What the edge graph needs to know about each supported architecture, read
from a Hugging Face config alone."""
from __future__ import annotations

# model_type -> (embedding writers, parallel attention and MLP by default)
_ARCHITECTURES = {
    "gpt2": (("tok_embeds", "pos_embeds"), False),
    "llama": (("embeds",), False),
    "mistral": (("embeds",), False),
    "qwen2": (("embeds",), False),
    "gpt_neox": (("embeds",), True),
    "tracr": (("tok_embeds", "pos_embeds"), False),   # fastedge.tracr: compiled RASP programs
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_ARCHITECTURES))


class UnsupportedArchitectureError(ValueError):
    pass


def _get(config, *names):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise UnsupportedArchitectureError(f"config of type {getattr(config, 'model_type', '?')!r} has "
                                       f"none of the attributes {names}")


def describe_config(config) -> dict:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    embeddings, parallel = _ARCHITECTURES[model_type]
    n_heads = _get(config, "num_attention_heads", "n_head")
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if model_type == "gpt_neox":
        parallel = bool(getattr(config, "use_parallel_residual", True))
    return dict(n_layers=_get(config, "num_hidden_layers", "n_layer"), n_heads=n_heads,
                n_kv_heads=n_kv, embeddings=embeddings, parallel_blocks=parallel,
                model_type=model_type)
