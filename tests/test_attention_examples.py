"""The char-transformer example trains and samples; the GPT-2 benchmark runs (smoke runs)."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    path = ROOT / "examples" / "char_transformer.py"
    spec = importlib.util.spec_from_file_location("char_transformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # an example or benchmark run end to end (FUNDL_SLOW=1; CI runs it)
def test_char_transformer_tiny_run_learns_and_samples(capsys):
    module = load_example()
    # optax's adamw counts steps in int32: not clean under the suite's strict promotion, so
    # the run uses JAX's standard promotion, as users run it.
    with jax.numpy_dtype_promotion("standard"):
        result = module.main(minutes=3, steps=40, width=32, heads=2, layers=1, context=32,
                             batch_size=8, lr=1e-2, eval_every=20, eval_batches=2,
                             sample_chars=12)  # fmt: skip
    losses = result["train_losses"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5  # nats: it learns
    assert result["held_out_bits"] < np.log2(103)  # better than uniform over the characters
    assert len(result["sample"]) == len("The import statement") + 12
    out = capsys.readouterr().out
    assert f"held-out: {result['held_out_bits']:.3f} bits/char" in out


@pytest.mark.slow  # an example or benchmark run end to end (FUNDL_SLOW=1; CI runs it)
def test_gpt2_benchmark_tiny(tmp_path):
    from benchmarks.gpt2 import flops_per_token, main, peak_tflops

    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        result = main(["--tiny", "--steps", "1", "--peak-tflops", "1.0",
                       "--json", str(tmp_path / "gpt2.json")])  # fmt: skip
    assert result["tokens_per_s"] > 0 and np.isfinite(result["last_loss"])
    assert result["mfu"] == result["model_tflops"] / 1.0
    assert (tmp_path / "gpt2.json").exists()
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("cpu") is None
    assert flops_per_token(100, 2, 8, 16) == 6 * 100 + 12 * 2 * 8 * 16


def test_gpt2_hand_written_baseline_is_the_same_model():
    # The benchmark's floor must be the same model: same param count, same loss at init
    # scale (ln(vocab) for near-uniform predictions), and a full unroll of fundl's stack
    # computes what the loop does.
    from benchmarks.gpt2 import TINY, make_loss

    cfg = dict(TINY)
    ids = jax.random.randint(jax.random.key(1), (2, cfg["context"] + 1), 0, cfg["vocab"])
    x, y = ids[:, :-1], ids[:, 1:]
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        losses, sizes = {}, {}
        for impl, unroll in [("fundl", 1), ("fundl", cfg["layers"]), ("plain", 1)]:
            params, loss_fn = make_loss(cfg, x, impl=impl, unroll=unroll)
            sizes[impl] = sum(p.size for p in jax.tree.leaves(params))
            losses[impl, unroll] = float(jax.jit(loss_fn)(params, x, y))
    assert sizes["fundl"] == sizes["plain"]
    np.testing.assert_allclose(list(losses.values()), np.log(cfg["vocab"]), rtol=0.02)
    # bf16 compute: the unrolled and looped stacks agree to bf16 rounding, not bitwise.
    np.testing.assert_allclose(losses["fundl", 1], losses["fundl", cfg["layers"]], rtol=1e-3)


@pytest.mark.slow  # an example or benchmark run end to end (FUNDL_SLOW=1; CI runs it)
def test_gpt2_memory_with_remat_is_smaller_and_the_loss_the_same():
    # XLA's account of the compiled step (compiled, not run): recomputing the blocks in the
    # backward pass keeps fewer activations; the loss is the same function either way.
    from benchmarks.gpt2 import TINY, main, make_loss

    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        rows = {row["remat"]: row for row in main(["--tiny", "--memory"])["memory"]}
        cfg = dict(TINY)
        ids = jax.random.randint(jax.random.key(1), (2, cfg["context"] + 1), 0, cfg["vocab"])
        x, y = ids[:, :-1], ids[:, 1:]
        losses = {}
        for remat in ("none", "full"):
            params, loss_fn = make_loss(cfg, x, remat=remat)
            losses[remat] = float(jax.jit(jax.value_and_grad(loss_fn))(params, x, y)[0])
    assert rows["full"]["temp_bytes"] < 0.6 * rows["none"]["temp_bytes"]
    assert rows["dots"]["temp_bytes"] < rows["none"]["temp_bytes"]
    # the same bf16 ops, compiled with and without the checkpoint (so fused and rounded
    # differently): the logits differ by a few bf16 ulps (2**-8 relative each), so the loss
    # agrees to about 1e-2 relative, not to float32 precision
    np.testing.assert_allclose(losses["full"], losses["none"], rtol=1e-2)
