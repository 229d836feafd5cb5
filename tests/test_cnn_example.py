"""The CNN example reaches its accuracy (the CNN benchmark's smoke run is in test_benchmarks)."""

import importlib.util
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    spec = importlib.util.spec_from_file_location("cnn_digits", ROOT / "examples" / "cnn_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains the example CNN: ~10 s
def test_cnn_example_reaches_098_on_digits(tmp_path, capsys):
    """The example's normal settings (15 epochs); about 15 s of CPU time on 2 cores."""
    module = load_example()
    plot = tmp_path / "loss.png"
    # optax's adam counts steps in int32: not clean under the suite's strict promotion, so
    # the run uses JAX's standard promotion, as users run it.
    with jax.numpy_dtype_promotion("standard"):
        accuracy = module.main(plot=str(plot))
    assert accuracy >= 0.98
    out = capsys.readouterr().out
    assert f"held-out accuracy: {accuracy:.4f}" in out
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed: no loss curve" in out
    else:
        assert plot.read_bytes().startswith(b"\x89PNG")
