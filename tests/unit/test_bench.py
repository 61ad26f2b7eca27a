"""`sdray bench`'s reference for multi-actor scaling: the machine's own, without Ray."""

from __future__ import annotations

import pytest

from sdray.config import SdrayConfig
from sdray.tools.bench import process_scaling


@pytest.mark.timeout(300)
def test_engine_processes_are_timed_together_each_with_its_own_rate(model_cache):
    config = SdrayConfig.model_validate(
        {
            "model": {"source": "tiny"},
            "generation": {"steps": 2, "width": 64, "height": 64},
            "batch": {"batch_size": 2},
        }
    )
    rates = process_scaling(config, processes=2, seconds=1.0)
    assert len(rates) == 2  # one figure from each process, both timed after the barrier
    assert all(rate > 0 for rate in rates)


@pytest.mark.timeout(120)
def test_a_process_that_cannot_load_its_engine_fails_the_measurement_at_once(model_cache):
    """No 300 s wait at the barrier for a process that died loading its model."""
    import threading

    config = SdrayConfig.model_validate(
        {
            "model": {"source": "/nonexistent/model"},
            "generation": {"steps": 2, "width": 64, "height": 64},
        }
    )
    with pytest.raises(threading.BrokenBarrierError):
        process_scaling(config, processes=1, seconds=1.0)
