"""`jaxsd bench memory`: the compiled memory of the issue #19 configurations, and what is alive at
their peak, read from XLA's dumps (bench/peak_memory.py).

The parser is checked on a step small enough to know what its peak must hold; the command runs one
row on the `tiny` UNet through the `jaxsd` console script (nothing is allocated: compile only).
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from bench.peak_memory import (
    KINDS,
    analyse_peak,
    compile_with_buffer_dump,
    param_layouts,
    state_budget,
)
from bench.suites import memory
from tests.helpers import jaxsd_command


def test_peak_of_a_small_train_step_has_its_gradients_and_activations(tmp_path):
    """An MLP's gradient step from shapes: at the peak of the backward pass the f32 weight gradients
    and the saved activations are alive; the arguments are the params and the batch."""
    params = {"w1": jax.ShapeDtypeStruct((512, 1024), jnp.float32), "w2": jax.ShapeDtypeStruct((1024, 512),
                                                                                                 jnp.float32)}
    x = jax.ShapeDtypeStruct((256, 512), jnp.float32)

    def step(p, x):
        loss = lambda p: jnp.mean(jnp.square(jnp.tanh(x @ p["w1"]) @ p["w2"]))
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p))

    compiled, _, _ = compile_with_buffer_dump(step, (params, x), str(tmp_path))
    state = SimpleNamespace(params=params, frozen={}, opt_state={}, ema=None)
    peak = analyse_peak(str(tmp_path), state, top=5)
    kinds = peak["kinds_gb"]
    assert set(kinds) == set(KINDS)
    assert kinds["gradients"] >= 4 * 512 * 1024 / 1e9  # at least one weight's gradient (2 MiB)
    assert kinds["activations"] >= 4 * 256 * 1024 / 1e9  # the [256, 1024] hidden state the backward pass needs
    assert kinds["attention"] == 0
    # the peak's buffers are no more than XLA's arguments + temporaries
    mem = compiled.memory_analysis()
    assert peak["live_gb"] * 1e9 <= mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    assert peak["top"] and peak["top"][0]["gb"] >= peak["top"][-1]["gb"]
    assert state_budget(state) == {"params_gb": 4 * 2 * 512 * 1024 / 1e9, "frozen_gb": 0.0, "opt_state_gb": 0.0,
                                   "ema_gb": 0.0}


def test_a_row_needing_a_setting_this_checkout_lacks_is_not_available():
    row = memory.Row("needs an option", "small", 16, 1, "float32", "adamw", 0.0, "full", 1.0,
                     requires=("optimizer.no_such_option=1",))
    assert "not available in this checkout" in memory.missing_settings(row)
    assert memory.missing_settings(memory.ROWS["sdxl-adafactor"]) is None  # adafactor + bf16 params exist


def test_a_rows_options_are_printed_and_can_be_overridden():
    """The table names each row's training options; --clip, --segmented-backward and --fused-update replace the
    row's."""
    parser = argparse.ArgumentParser()
    memory.add_arguments(parser)
    row = memory.ROWS["sd15-b4"]
    own = memory.row_config("sd15-b4", row, parser.parse_args([]))
    assert memory.options(own) == "adamw, clip 1, remat full"
    changed = memory.row_config("sd15-b4", row, parser.parse_args(["--clip", "0", "--segmented-backward", "on"]))
    assert changed["clip"] == 0.0 and changed["segmented_backward"]
    assert memory.options(changed) == "adamw, no clip, remat full, segmented"
    fused = memory.row_config("sd15-b4", row, parser.parse_args(["--clip", "0", "--segmented-backward", "on",
                                                                  "--fused-update", "on"]))
    assert fused["fused_update"] and not changed["fused_update"]
    assert memory.options(fused) == "adamw, no clip, remat full, segmented, fused update"
    lora = memory.row_config("sdxl-lora16", memory.ROWS["sdxl-lora16"], parser.parse_args([]))
    assert memory.options(lora) == "LoRA r16 bf16 base, adamw, clip 1, remat full"
    adafactor = memory.row_config("sdxl-adafactor", memory.ROWS["sdxl-adafactor"], parser.parse_args([]))
    assert memory.options(adafactor) == "adafactor, no clip, remat full, bf16 params"


def test_a_conv_kernel_counts_in_its_im2col_layout_too():
    """A [3, 3, Cin, Cout] kernel's gradient made by the im2col lowering is a [9·Cin, Cout] matrix."""
    layouts = param_layouts([(3, 3, 2560, 1280), (1280,)])
    assert {(3, 3, 1280, 2560), (1280, 23040), (1280,)} == layouts
    assert (1280, 2560) not in layouts


@pytest.mark.slow
def test_memory_command_on_the_small_unet(tmp_path):
    """One row (SD1.5's batch-4 full fine-tune, on the `tiny` UNet at 8×8 latents) through the
    command a user types: its record has the budget from the state and the peak from XLA's dump."""
    path = tmp_path / "results.jsonl"
    proc = jaxsd_command("bench", "memory", "--unet", "tiny", "--latent", "8", "--rows", "sd15-b4", "--top", "3",
                         "--json", path, timeout=1500)
    (rec,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert rec["suite"] == "memory" and rec["config"]["row"] == "sd15-b4" and rec["config"]["unet"] == "tiny"
    j = rec["jaxsd"]
    trained = j["info"]["num_trainable"]
    assert j["budget"]["params_gb"] == pytest.approx(4 * trained / 1e9)  # fp32 masters
    assert j["budget"]["opt_state_gb"] == pytest.approx(8 * trained / 1e9, rel=1e-3)  # AdamW: two fp32 moments
    assert j["argument_gb"] >= j["budget"]["params_gb"] + j["budget"]["opt_state_gb"]
    assert 0 < sum(j["peak"]["kinds_gb"].values()) <= j["temp_gb"] + j["output_gb"]
    assert len(j["peak"]["top"]) == 3
    assert "sd15-b4 (tiny)" in proc.stdout and "largest buffers alive at the peak" in proc.stdout
