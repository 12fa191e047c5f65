"""A multi-turn environment trains: GRPO on `GuessNumber` (reward only at the episode's end) raises the tiny
random policy's mean reward; and at equal weights the trainer's log-probs of the sampled tokens are the
sampler's, so the importance ratio of a whole trajectory starts at 1."""

import torch

from rlhf_engine.data.samples import SampleBatch
from rlhf_engine.envs.protocol import EnvironmentConfig
from rlhf_engine.models.tiny import TINY_CHAT_TEMPLATE, TinyLlamaSpec, make_tiny_model_dir
from rlhf_engine.rollout.config import GeneratorConfig, SamplingConfig
from rlhf_engine.rollout.episodes import EpisodeRunner
from rlhf_engine.trainer.ppo.config import PPOConfig
from tests.helpers.threads import one_torch_thread  # noqa: F401 (autouse fixture)

B, K, BUDGET, STEPS = 32, 4, 64, 20


def test_grpo_on_guess_the_number_raises_the_reward(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.rollout.hf_backend import HFGenerator
    from rlhf_engine.trainer.ppo.trainer import PPOTrainer

    folder = make_tiny_model_dir(tmp_path / "tiny", TinyLlamaSpec(), chat_template=TINY_CHAT_TEMPLATE)
    gen = HFGenerator(GeneratorConfig(model=str(folder), backend="transformers", max_model_len=256,
                                      sampling=SamplingConfig(n=K, max_new_tokens=BUDGET)))
    env = EnvironmentConfig("rlhf_engine.envs.guess_number:GuessNumber", kwargs={"max_guesses": 3}, max_turns=3,
                            max_turn_tokens=4)
    runner = EpisodeRunner(gen, env, max_prompt_tokens=128)
    config = PPOConfig(batch_size=B, mini_batch_size=16, ppo_epochs=2, learning_rate=2e-3, response_length=BUDGET,
                       num_generations=K, advantage_estimator="grpo", init_kl_coef=0.01, adap_kl_ctrl=False, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = PPOTrainer(config=config, model=policy, tokenizer=AutoTokenizer.from_pretrained(folder))
    rewards, turns = [], []
    for step in range(STEPS):
        targets = [(step * 8 + i) % 10 for i in range(B // K)]
        samples = runner.run([[1]] * (B // K), [{"target": t} for t in targets], gen.config.sampling, seed=step)
        assert all(s.reward is not None or s.episode.truncated == "token_budget" for s in samples)
        scores = torch.tensor([s.reward if s.reward is not None else 0.0 for s in samples])
        stats = trainer.step_batch(SampleBatch.from_samples(samples, scores=scores))
        if step == 0:  # equal weights: the trainer's pi_old of the sampled tokens is the sampler's
            assert abs(stats["off_policy/behaviour_kl"]) < 1e-4
        gen.update_weights(trainer.policy_version, dict(trainer.model.state_dict()))
        rewards.append(float(scores.mean()))
        turns.append(sum(s.episode.turns for s in samples) / B)
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"guess-the-number reward: first 5 steps {before:.3f}, last 5 {after:.3f}; turns {turns[0]:.2f} -> "
          f"{turns[-1]:.2f}")
    assert after > before + 0.1, rewards
    assert min(turns) > 1.5  # the episodes are multi-turn
