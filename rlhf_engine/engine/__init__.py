"""The run: `RLHFEngine` (`core`) joins generators and the trainer; its config (`config`), the checks made
before any work (`preflight`), the generator processes it starts and watches (`generators`, `supervisor`),
prompt intake and held-out evaluation, the CPU plan, the PPO trainer built from a config (`build_trainer`),
and the trainer on N ranks (`ranks`)."""
