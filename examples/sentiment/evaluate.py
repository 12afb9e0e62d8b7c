"""Step 5: expected reward and sequence KL(pi || pi_ref) of a policy, estimated from its own samples."""
from __future__ import annotations

import math

import torch

from examples.sentiment import lm
from examples.sentiment.reward import sentiment


def _mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def evaluate_policy(policy, reference, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                    seed: int) -> dict[str, float]:
    """Sample one completion per prompt from ``policy`` (temperature 1) and score it.

    reward: mean VADER score of prompt + completion. kl: mean over samples of
    sum_t (log pi(y_t | ...) - log pi_ref(y_t | ...)), an unbiased estimate of the
    sequence KL(pi || pi_ref) because the samples come from pi itself.
    """
    samples = lm.sample(policy, tokenizer, prompts, max_new_tokens, batch_size, seed)
    prompt_ids = [p for p, _, _ in samples]
    completion_ids = [c for _, c, _ in samples]
    pol = lm.token_logps(policy, tokenizer, prompt_ids, completion_ids)
    ref = lm.token_logps(reference, tokenizer, prompt_ids, completion_ids)
    kls = [float((a - b).sum()) for a, b in zip(pol, ref)]
    texts = [p + tokenizer.decode(c, skip_special_tokens=True) for p, c in zip(prompts, completion_ids)]
    rewards = sentiment(texts)
    reward, reward_se = _mean_se(rewards)
    kl, kl_se = _mean_se(kls)
    return {
        "reward": reward, "reward_se": reward_se, "kl": kl, "kl_se": kl_se,
        "finished": sum(f for _, _, f in samples) / len(samples),
        "length": sum(len(c) for c in completion_ids) / len(completion_ids),
    }


@torch.no_grad()
def per_token_rewards(policy, reference, tokenizer, prompt: str, completion_ids: list[int], beta: float) -> list[tuple[str, float]]:
    """``(token text, beta * (log pi - log pi_ref))`` for each completion token (EOS shown as ``</s>``)."""
    from prefopt.analysis import token_rewards

    p_ids = tokenizer(prompt)["input_ids"]
    pol = lm.token_logps(policy, tokenizer, [p_ids], [completion_ids])[0]
    ref = lm.token_logps(reference, tokenizer, [p_ids], [completion_ids])[0]
    r = token_rewards(pol, ref, torch.ones_like(pol), beta)
    words = ["</s>" if t == tokenizer.eos_token_id else tokenizer.decode([t]) for t in completion_ids]
    return list(zip(words, r.tolist()))
