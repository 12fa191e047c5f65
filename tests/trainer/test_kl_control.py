"""KL controllers: the adaptive one moves beta towards the target, the fixed one does not move."""

import pytest

from rlhf_engine.trainer.ppo.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_adaptive_raises_coef_when_kl_above_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # error = clip(9/6 - 1, -0.2, 0.2) = 0.2 ; beta = 0.2 * (1 + 0.2 * 256 / 10000) = 0.2 * 1.00512 = 0.201024
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.201024)


def test_adaptive_lowers_coef_when_kl_below_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    # error = 5.7/6 - 1 = -0.05 ; beta = 0.2 * (1 - 0.05 * 100 / 1000) = 0.2 * 0.995 = 0.199
    ctl.update(5.7, 100)
    assert ctl.value == pytest.approx(0.199)


def test_adaptive_at_target_keeps_coef():
    ctl = AdaptiveKLController(0.3, target=4.0, horizon=100)
    ctl.update(4.0, 50)
    assert ctl.value == pytest.approx(0.3)


def test_fixed_never_moves_and_state_round_trips():
    ctl = make_kl_controller(0.1, adaptive=False, target=6.0, horizon=10)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.1
    other = make_kl_controller(0.5, adaptive=True, target=6.0, horizon=10)
    other.load_state_dict({"value": 0.25})
    assert other.value == 0.25
