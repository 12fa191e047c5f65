"""KL coefficient controllers: fixed, and the adaptive one of Ziegler et al. (2019)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional controller that moves the KL coefficient so the observed KL tracks `target`.

    error = clip(KL / target - 1, -0.2, 0.2)      # KL: mean over sequences of the summed token KL
    value <- value * (1 + error * n_steps / horizon)
    """

    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update after a batch of `n_steps` samples whose mean sequence KL was `current_kl`."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def make_kl_controller(init_kl_coef: float, adaptive: bool, target: float, horizon: float):
    """The controller a config asks for (`adap_kl_ctrl`)."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
