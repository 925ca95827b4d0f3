"""PPO-max arithmetic against numbers worked out by hand (the working is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from workers.training import ppo_math as pm


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


def test_gae_gamma_one():
    # t=2: d=1-0.7=0.3, A=0.3; t=1: d=0.7-0.6=0.1, A=0.1+0.95*0.3=0.385; t=0: d=0.1, A=0.1+0.95*0.385=0.46575
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = pm.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(adv, [[0.46575, 0.385, 0.3]])
    close(ret, [[0.96575, 0.985, 1.0]])


def test_gae_discount_and_padding():
    # The padded position (reward 9, value 5) must not leak: it is treated as the end of the episode.
    # t=1: d=1.0+0.9*0-0.4=0.6; t=0: d=0.2+0.9*0.4-0.1=0.46, A=0.46+0.9*0.5*0.6=0.73
    rewards = torch.tensor([[0.2, 1.0, 9.0]])
    values = torch.tensor([[0.1, 0.4, 5.0]])
    adv, ret = pm.gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.5)
    close(adv, [[0.73, 0.6, 0.0]])
    close(ret, [[0.83, 1.0, 0.0]])


def test_whiten_full_and_masked():
    # mean 2.5, unbiased var 5/3, std 1.2910
    close(
        pm.whiten(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4)),
        [[-1.161895, -0.387298, 0.387298, 1.161895]],
    )
    # masked: [1,2,3] -> mean 2, unbiased var 1; the padded 100 is ignored and comes back as 0
    close(
        pm.whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])),
        [[-1.0, 0.0, 1.0, 0.0]],
    )
    # shift_mean=False keeps the mean: [-1,0,1] + 2
    close(pm.whiten(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), shift_mean=False), [[1.0, 2.0, 3.0]])


def test_masked_mean_and_var():
    values = torch.tensor([[1.0, 3.0, 50.0], [5.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    close(pm.masked_mean(values, mask), 5.0)  # (1+3+5+7+9)/5
    close(pm.masked_mean(values, mask, dim=1), [2.0, 7.0])
    close(pm.masked_var(values, mask), 10.0)  # squares 16+4+0+4+16=40, /4
    close(pm.masked_var(values, mask, unbiased=False), 8.0)
    close(pm.masked_mean(values, torch.zeros_like(mask)), 0.0)


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(pm.kl_k1(logp, ref), [math.log(2.0)])  # log p - log q
    close(pm.kl_k3(logp, ref), [-0.5 + math.log(2.0)])  # r-1-log r with r=q/p=0.5
    close(pm.kl_k3(ref, ref), [0.0])
    # approx KL to the old policy: k3 of (old, new) averaged over the mask
    close(
        pm.approx_kl(
            torch.tensor([[math.log(0.25), 0.0]]),
            torch.tensor([[math.log(0.5), 5.0]]),
            torch.tensor([[1, 0]]),
        ),
        -0.5 + math.log(2.0),
    )


def test_k1_and_k3_agree_in_expectation():
    # Both are unbiased for KL(p||q) when tokens are drawn from p.
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    exact = (p * (p.log() - q.log())).sum()
    draws = torch.multinomial(p, 200_000, replacement=True)
    k1 = pm.kl_k1(p.log()[draws], q.log()[draws]).mean()
    k3 = pm.kl_k3(p.log()[draws], q.log()[draws]).mean()
    close(k1, exact, tol=0.02)
    close(k3, exact, tol=0.02)


def test_clipped_policy_loss():
    # token | A  | ratio | -A r | -A clip(r) | max  | clipped?
    #   1   |  1 | 1.5   | -1.5 | -1.2       | -1.2 | yes
    #   2   | -1 | 1.5   |  1.5 |  1.2       |  1.5 | no
    #   3   |  2 | 0.5   | -1.0 | -1.6       | -1.0 | no
    #   4   | -2 | 0.5   |  1.0 |  1.6       |  1.6 | yes
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    out = pm.clipped_policy_loss(logp, old, adv, torch.ones(1, 4), clip=0.2)
    close(out.loss, 0.9 / 4)
    close(out.clip_fraction, 0.5)
    close(out.ratio_mean, 1.0)
    out.loss.backward()
    # d/dlogp of -A r is -A r on unclipped tokens and 0 on clipped ones, over 4 tokens
    close(logp.grad, [[0.0, 1.5 / 4, -1.0 / 4, 0.0]])


def test_clipped_policy_loss_ignores_padding():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.0, 3.0]])
    out = pm.clipped_policy_loss(logp, old, torch.tensor([[2.0, 100.0]]), torch.tensor([[1, 0]]), clip=0.2)
    close(out.loss, -2.0)
    close(out.clip_fraction, 0.0)


def test_clipped_value_loss():
    # V    | old | R   | clip(V) | (V-R)^2 | (clipV-R)^2 | max  | clipped?
    # 1.0  | 0.5 | 1.0 | 0.7     | 0       | 0.09        | 0.09 | yes
    # 0.6  | 0.5 | 0.0 | 0.6     | 0.36    | 0.36        | 0.36 | no
    # 0.0  | 0.5 | 0.0 | 0.3     | 0       | 0.09        | 0.09 | yes
    # 2.0  | 0.5 | 3.0 | 0.7     | 1.0     | 5.29        | 5.29 | yes
    values = torch.tensor([[1.0, 0.6, 0.0, 2.0]])
    out = pm.clipped_value_loss(
        values, torch.full((1, 4), 0.5), torch.tensor([[1.0, 0.0, 0.0, 3.0]]), torch.ones(1, 4), clip=0.2
    )
    close(out.loss, 0.5 * 5.83 / 4)
    close(out.clip_fraction, 0.75)


def test_token_rewards_put_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = pm.token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.1)
    close(rewards, [[-0.01, -0.02, 0.97], [-0.05, 1.95, 0.0]])
    assert pm.last_index(mask).tolist() == [2, 1]


def test_running_moments_merge_batches():
    running = pm.RunningMoments()
    assert running.update(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    close(running.mean, 2.0)
    close(running.std, 1.0)  # unbiased std of [1,2,3]
    batch_mean, batch_std = running.update(torch.tensor([4.0, 5.0]))
    close(batch_mean, 4.5)
    close(batch_std, math.sqrt(0.5))
    close(running.mean, 3.0)  # everything seen: [1..5]
    close(running.std, math.sqrt(2.5))
    copy = pm.RunningMoments()
    copy.load_state_dict(running.state_dict())
    assert copy.state_dict() == running.state_dict()


def test_scale_rewards_divides_by_running_std_and_clips():
    # [2, -4]: mean -1, unbiased var 18, std 4.2426 -> [0.4714, -0.9428]; clip 0.5 cuts the second
    close(pm.scale_rewards(torch.tensor([2.0, -4.0]), pm.RunningMoments(), clip=10.0), [0.471405, -0.942809])
    close(pm.scale_rewards(torch.tensor([2.0, -4.0]), pm.RunningMoments(), clip=0.5), [0.471405, -0.5])


def test_reward_affine_is_the_z_score_then_the_running_std():
    # raw 4.5 with RM stats mean 0.5, std 2: z = 2; running std 4 -> 0.5
    scale, shift = pm.reward_affine({"mean": 0.5, "std": 2.0}, running_std=4.0)
    assert (scale, shift) == pytest.approx((0.125, -0.0625))
    assert 4.5 * scale + shift == pytest.approx(0.5)
    assert pm.reward_affine({"mean": 0.5, "std": 2.0}) == pytest.approx((0.5, -0.25))
    assert pm.reward_affine(None, running_std=2.0) == pytest.approx((0.5, 0.0))  # no RM statistics


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1]])
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(pm.logprobs_from_logits(logits, labels), expected)
    close(pm.entropy_from_logits(logits)[0, 1], math.log(3.0))


def test_repeated_ngram_share():
    # bigrams (1,2),(2,1),(1,2),(2,1),(1,2): 2 distinct of 5
    assert pm.repeated_ngram_share([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(0.6)
    assert pm.repeated_ngram_share([1, 2, 3, 4, 5], n=2) == 0.0
    assert pm.repeated_ngram_share([1], n=4) == 0.0


def test_shares_of_a_split_minibatch_add_up_to_its_losses():
    # A mini-batch split over two processes: each divides its sums by the whole mini-batch's token
    # count, and the shares add up to the one-process losses and statistics.
    g = torch.Generator().manual_seed(0)
    logprobs, old = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 0.1
    old = logprobs.detach() + old
    advantages, values, old_values, returns = (torch.randn(6, 5, generator=g) for _ in range(4))
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    count = mask.sum()
    whole_policy = pm.clipped_policy_loss(logprobs, old, advantages, mask, 0.2)
    whole_value = pm.clipped_value_loss(values, old_values, returns, mask, 0.2)
    halves = [slice(0, 3), slice(3, 6)]
    policy = [pm.clipped_policy_loss(logprobs[h], old[h], advantages[h], mask[h], 0.2, count) for h in halves]
    value = [pm.clipped_value_loss(values[h], old_values[h], returns[h], mask[h], 0.2, count) for h in halves]
    for field in ("loss", "clip_fraction", "approx_kl", "ratio_mean"):
        total = sum(getattr(part, field) for part in policy)
        torch.testing.assert_close(total, getattr(whole_policy, field), rtol=1e-6, atol=1e-7)
    for field in ("loss", "clip_fraction"):
        total = sum(getattr(part, field) for part in value)
        torch.testing.assert_close(total, getattr(whole_value, field), rtol=1e-6, atol=1e-7)
    assert pm.share_of_mean(values, mask, None) == pm.masked_mean(values, mask)
