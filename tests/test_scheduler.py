"""The flow-matching scheduler: step count, time shift, endpoints, the Euler step."""
import json

import numpy as np
import pytest
from mindspore import Tensor

from stepvideo_ms.diffusion.scheduler import FlowMatchScheduler, shift_time


@pytest.mark.parametrize("steps", [1, 3, 30, 50])
@pytest.mark.parametrize("shift", [1.0, 13.0, 17.0])
def test_schedule_has_steps_plus_one_sigmas_from_noise_to_data(steps, shift):
    s = FlowMatchScheduler()
    timesteps = s.set_timesteps(steps, shift)
    assert len(s.sigmas) == steps + 1 and len(timesteps) == steps
    assert s.sigmas[0] == 0.0 and s.sigmas[-1] == pytest.approx(1.0)
    assert np.all(np.diff(s.sigmas) > 0)
    assert s.sigmas.dtype == np.float32


def test_shift_formula_and_identity_at_one():
    t = np.linspace(1, 0, 11, dtype=np.float32)
    np.testing.assert_allclose(shift_time(t, 1.0), t, atol=1e-7)
    np.testing.assert_allclose(shift_time(t, 13.0), 13 * t / (1 + 12 * t), rtol=1e-6)


def test_larger_shift_spends_more_steps_near_noise():
    a, b = FlowMatchScheduler(), FlowMatchScheduler()
    a.set_timesteps(10, 5.0)
    b.set_timesteps(10, 17.0)
    assert np.all(b.sigmas[1:-1] < a.sigmas[1:-1])


def test_reverse_keeps_the_shifted_sigmas():
    s = FlowMatchScheduler(reverse=True)
    s.set_timesteps(4, 13.0)
    assert s.sigmas[0] == pytest.approx(1.0) and s.sigmas[-1] == 0.0


def test_euler_step_moves_by_velocity_times_dt():
    s = FlowMatchScheduler()
    s.set_timesteps(2, 3.0)
    x = Tensor(np.ones((2, 3), np.float32))
    v = Tensor(np.full((2, 3), 2.0, np.float32))
    out = s.step(v, 0, x).asnumpy()
    np.testing.assert_allclose(out, 1 + 2 * (s.sigmas[1] - s.sigmas[0]), rtol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMatchScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="time_shift"):
        FlowMatchScheduler().set_timesteps(5, 0.0)
    with pytest.raises(ValueError, match="solver"):
        FlowMatchScheduler(solver="heun")


def test_from_dir_reads_the_scheduler_config(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowMatchDiscreteScheduler",
                                                                "num_train_timesteps": 1000, "reverse": True}))
    assert FlowMatchScheduler.from_dir(str(tmp_path)).reverse is True
    assert FlowMatchScheduler.from_dir(str(tmp_path / "absent")).reverse is False
