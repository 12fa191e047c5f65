"""Multi-turn samples in the trainer: EOS cuts only the last turn, and GAE runs over the model's tokens alone
(environment tokens carry no value target; the first token of the next turn bootstraps the last of a turn)."""

import torch

from rlhf_engine.ops import gae
from rlhf_engine.trainer.advantages import gae_on_valid_tokens
from rlhf_engine.trainer.ppo.experience import make_token_batch, truncate_after_eos

EOS = 2


def test_eos_cuts_after_the_last_environment_token_only():
    # turn 1 (ends with EOS) | environment (has an EOS too) | turn 2: EOS, then 2 sampled tokens past it
    response = torch.tensor([5, 6, EOS, 9, EOS, 9, 7, 8, EOS, 11, 12])
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    assert truncate_after_eos(response, [EOS], mask).tolist() == [5, 6, EOS, 9, EOS, 9, 7, 8, EOS]
    assert truncate_after_eos(response, [EOS]).tolist() == [5, 6, EOS]  # single-turn: the first EOS
    batch = make_token_batch([torch.tensor([1, 3])], [response], 0, [EOS], loss_mask=[mask])
    assert batch.has_eos.tolist() == [True]
    assert batch.loss_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]  # the environment tokens stay untrained


def test_gae_skips_environment_tokens():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    rewards = torch.randn(mask.shape, generator=g) * mask
    values = torch.randn(mask.shape, generator=g)
    adv, ret = gae_on_valid_tokens(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(2):
        keep = mask[b].bool()
        # the model's tokens on their own, back to back: the same advantages and value targets
        a, r = gae(rewards[b, keep][None], values[b, keep][None], torch.ones(1, int(keep.sum())), 0.9, 0.8)
        torch.testing.assert_close(adv[b, keep], a[0])
        torch.testing.assert_close(ret[b, keep], r[0])
        assert (adv[b, ~keep] == 0).all() and (ret[b, ~keep] == 0).all()
    # by hand at a turn boundary of row 0: token 1 (last of turn 1) bootstraps from token 5 (first of turn 2)
    delta1 = rewards[0, 1] + 0.9 * values[0, 5] - values[0, 1]
    torch.testing.assert_close(adv[0, 1], delta1 + 0.9 * 0.8 * adv[0, 5])


def test_the_reward_model_reads_the_whole_trajectory(make_lm, make_reward_model, tokenizer):
    """With the samples' loss mask, the reward model scores up to the end of the last turn, not the first."""
    from rlhf_engine.models.reward_scoring import model_scores
    from rlhf_engine.trainer.ppo.config import PPOConfig
    from rlhf_engine.trainer.ppo.trainer import PPOTrainer

    eos = tokenizer.eos_token_id
    reward_model = make_reward_model(seed=1)
    trainer = PPOTrainer(PPOConfig(batch_size=2, mini_batch_size=2, advantage_estimator="grpo", num_generations=2),
                         make_lm(seed=0), tokenizer=tokenizer, reward_model=reward_model)
    prompt = torch.tensor([5, 6, 7])
    response = torch.tensor([20, 21, eos, 30, 31, 22, 23, eos])
    mask = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    got = trainer.score([prompt], [response], loss_mask=[mask])
    full = torch.cat([prompt, response])[None]
    with torch.no_grad():
        want = model_scores(reward_model, full, torch.ones_like(full), torch.arange(full.shape[1])[None])
        first_turn = model_scores(reward_model, full[:, :6], torch.ones(1, 6, dtype=torch.long),
                                  torch.arange(6)[None])
    torch.testing.assert_close(got.cpu(), want.float().cpu(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(want, first_turn)
