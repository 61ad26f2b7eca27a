"""The stand-in device's measurement: busy fractions, and naming the stage that holds it back."""

from __future__ import annotations

import numpy as np
import pytest

from sdray.requests import GenerationRequest
from sdray.tools.bench_device import (
    SHAPES,
    DeviceShape,
    StandInEngine,
    bottleneck,
    busy_fractions,
    parse_shape,
)


def test_busy_fractions_in_steady_state_and_end_to_end():
    # 20 holds of 1 s, 0.1 s apart, after 5 s of start-up; a 10 s tail.
    holds = [(5 + 1.1 * i, 6 + 1.1 * i, 8) for i in range(20)]
    busy = busy_fractions(holds, launched=0.0, finished=5 + 1.1 * 20 + 10)
    assert busy["steady"] == pytest.approx(1 / 1.1, abs=1e-3)  # start-up and tail left out
    assert busy["end_to_end"] == pytest.approx(20 / 37, abs=1e-3)
    assert (busy["batches"], busy["busy_s"]) == (20, 20.0)
    assert busy_fractions(holds[:5], 0.0, 30.0)["steady"] is None  # too few to tell


def test_the_stand_in_holds_its_device_per_batch_and_returns_real_sizes(tmp_path):
    engine = StandInEngine(DeviceShape("t", 64, 2, 0.02), log_dir=str(tmp_path))
    requests = [
        GenerationRequest(
            id=str(i),
            prompt="p",
            negative_prompt="",
            seed=i,
            steps=1,
            guidance_scale=1.0,
            width=96 if i == 4 else 64,
            height=64,
            scheduler="ddim",
        )
        for i in range(5)
    ]
    results = engine.generate(requests)
    assert [r.image.shape for r in results] == [(64, 64, 3)] * 4 + [(64, 96, 3)]
    assert np.array_equal(results[0].image, engine.generate(requests[:1])[0].image)  # by seed
    assert not np.array_equal(results[0].image, results[1].image)
    (log,) = tmp_path.glob("holds-*.jsonl")
    holds = [line.split(",") for line in log.read_text().splitlines()]
    assert [int(h[2].strip(" ]")) for h in holds] == [2, 2, 1, 1]  # batches of one size


def test_a_cpu_bound_run_names_the_encode_stage():
    shape = DeviceShape("t", 512, 64, 0.1)  # 640 images/s a device: no CPU keeps up
    figures = {
        "steady_min": 0.4,
        "end_to_end_ratio": 0.35,
        "actors": 2,
        "images_per_s": 30.0,
        "wall_s": 10.0,
        "cpu_s": {"encode and write tasks": 15.0, "model actors": 1.0, "driver": 1.0},
    }
    line = bottleneck(figures, shape, "png", cores=2)
    assert line.startswith("CPU-bound (85% of the 2 cores busy") and "512x512 costs" in line
    assert "the encode and write tasks took 75% of the 2 cores" in line
    # Busy in steady state, yet the job behind the devices (a write backlog): still named.
    behind = bottleneck({**figures, "steady_min": 0.99}, shape, "png", cores=2)
    assert behind.startswith("CPU-bound") and "the job at 0.35x" in behind
    idle = {**figures, "cpu_s": {"driver (Ray Data's executor)": 4.0}}
    assert bottleneck(idle, shape, "png", cores=2).startswith("held back with CPU to spare")
    on_target = {**figures, "steady_min": 0.99, "end_to_end_ratio": 0.95}
    assert bottleneck(on_target, shape, "png", cores=2) is None
    assert parse_shape("sdxl") == SHAPES["sdxl"]
    assert parse_shape("2048:1:4.5") == DeviceShape("2048:1:4.5", 2048, 1, 4.5)
    with pytest.raises(ValueError, match="device shape 'big'"):
        parse_shape("big")
