"""fastedge without the ``tracr`` extra: the package imports, the Tracr model
class works, and everything that needs Tracr says how to install it.

Runs whether or not Tracr is installed: a fresh Python process hides it,
either as not installed (``sys.modules[name] = None`` makes ``import name``
fail, for tracr and the JAX stack it brings) or as a broken install (a
``tracr`` package first on the path whose ``__init__`` raises ImportError).
"""
import os
import subprocess
import sys
import textwrap

import pytest

HINT = 'pip install -e ".[tracr]"'

_NOT_INSTALLED = """
import sys
for name in ("tracr", "jax", "jaxlib", "haiku", "chex"):
    sys.modules[name] = None
"""

_CHECKS = textwrap.dedent("""
    import sys
    import types
    import torch
    import fastedge
    import fastedge.tracr
    from fastedge.tracr import TracrConfig, TracrForCausalLM, programs

    assert fastedge.tracr.tracr_available() is False

    def import_error(call):
        try:
            call()
        except ImportError as e:
            return str(e)
        raise SystemExit(f"no ImportError from {call}")

    print("load:", import_error(lambda: programs.load("reverse")))
    print("compile_program:", import_error(lambda: fastedge.tracr.compile_program(None, {1, 2}, 3)))
    # something shaped like a compiled model gets as far as needing Tracr
    shaped = types.SimpleNamespace(params={}, model_config=types.SimpleNamespace(layer_norm=False),
                                   residual_labels=[], input_encoder=None, output_encoder=None)
    print("from_tracr:", import_error(lambda: fastedge.tracr.from_tracr(shaped)))
    # anything else is still not a compiled Tracr model
    try:
        fastedge.tracr.from_tracr(object())
    except fastedge.tracr.TracrConversionError as e:
        print("conversion error:", e)

    # the model class needs only PyTorch and transformers
    config = TracrConfig(vocab_size=3, n_positions=4, hidden_size=5, head_dim=2, intermediate_size=3,
                         output_size=2, input_vocab=["a", "BOS", "pad"], output_vocab=[0, 1], pad_token="pad")
    model = TracrForCausalLM(config)
    print("logits:", tuple(model(torch.tensor([[1, 0, 0]])).logits.shape))
    print("loaded:", sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in
                            ("tracr", "jax", "haiku")))
""")


@pytest.mark.parametrize("how", ["not-installed", "broken-install"])
def test_fastedge_works_without_tracr(how, tmp_path):
    env = dict(os.environ)
    prelude = ""
    if how == "not-installed":
        prelude = _NOT_INSTALLED
    else:
        fake = tmp_path / "fake" / "tracr"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text('raise ImportError("simulated broken tracr install")\n')
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "fake"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", prelude + _CHECKS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    for what in ("load", "compile_program", "from_tracr"):
        assert HINT in lines[what], (what, lines[what])
        assert "needs Tracr, which could not be imported" in lines[what]
    assert "not a compiled Tracr model" in lines["conversion error"]
    assert lines["logits"] == "(1, 3, 2)"
    if how == "not-installed":
        assert lines["loaded"] == "[]"
    else:
        assert "simulated broken tracr install" in lines["load"]
