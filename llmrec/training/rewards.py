"""Rule-based rewards of latent GRPO: small pure functions over a group's scores.

Every reward takes a :class:`RewardInputs` (the members' per-token log-probabilities of the true next
item's title under their latent, and optionally the scores of a sampled candidate set; in generation mode the
titles the members sampled) and returns one float per member. Rewards are combined as a weighted sum (TRL's ``reward_funcs`` / ``reward_weights``);
:data:`REWARD_FUNCTIONS` is the registry recipes name them from.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "REWARD_FUNCTIONS",
    "RewardInputs",
    "candidate_log_softmax",
    "combine_rewards",
    "exact_match",
    "log_likelihood",
    "neg_ppl",
    "reciprocal_rank",
    "token_f1",
]


@dataclass
class RewardInputs:
    """What a reward may look at, for ``M`` members (rows).

    Attributes:
        token_logprobs: ``[M, T]`` log p(y_t | prompt, latent, y_<t) of the target title's tokens.
        token_mask: ``[M, T]`` 1 where ``token_logprobs`` is a real target token, 0 on padding.
        candidate_scores: ``[M, C]`` mean per-token log-likelihood of each sampled candidate title under the
            member's latent, or ``None`` when no rank-based reward is enabled.
        target_index: ``[M]`` column of the true item in ``candidate_scores``.
        sampled_titles: generation mode (``rollout: generate``): the title each member sampled (then
            ``token_logprobs`` are those of the sampled title's tokens, not the target's).
        target_titles: generation mode: each member's true next-item title.
    """

    token_logprobs: torch.Tensor
    token_mask: torch.Tensor
    candidate_scores: torch.Tensor | None = None
    target_index: torch.Tensor | None = None
    sampled_titles: list[str] | None = None
    target_titles: list[str] | None = None


def _mean_logprob(inputs: RewardInputs) -> torch.Tensor:
    # float64: exp(-mean) overflows float32 once the mean log-prob drops below about -88.
    lp = inputs.token_logprobs.double()
    mask = inputs.token_mask.to(torch.float64)
    count = mask.sum(-1)
    if bool((count == 0).any()):
        raise ValueError("a member has no target tokens")
    return torch.where(mask > 0, lp, torch.zeros_like(lp)).sum(-1) / count


def neg_ppl(inputs: RewardInputs) -> torch.Tensor:
    """Minus the perplexity of the true title: ``-exp(-mean_t log p(y_t))`` (the LatentR3 paper's reward).

    >>> lp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 1.0]]))
    >>> [round(x, 6) for x in neg_ppl(RewardInputs(lp, torch.ones(2, 2))).tolist()]
    [-2.0, -2.0]
    """
    return -torch.exp(-_mean_logprob(inputs))


def log_likelihood(inputs: RewardInputs) -> torch.Tensor:
    """Mean per-token log-likelihood of the true title (bounded above by 0, unlike ``neg_ppl`` not exploding).

    >>> lp = torch.tensor([[-1.0, -3.0, 0.0], [-0.5, 0.0, 0.0]])
    >>> log_likelihood(RewardInputs(lp, torch.tensor([[1, 1, 0], [1, 0, 0]])))
    tensor([-2.0000, -0.5000], dtype=torch.float64)
    """
    return _mean_logprob(inputs)


def reciprocal_rank(inputs: RewardInputs) -> torch.Tensor:
    """``1 / rank`` of the true item among the sampled candidates, ranked by ``candidate_scores``.

    Ties are counted against the target (rank = 1 + candidates scoring at least as high, itself excluded),
    so a latent that makes every candidate look alike earns nothing. A member with a NaN among its scores (the
    target's or a competitor's) gets a NaN reward, as from :func:`candidate_log_softmax`: its rank is unknown, and
    the trainer skips (and counts) groups with a non-finite reward. (Compared as numbers, a NaN competitor never
    scores "at least as high", so it silently improved the target's rank; a NaN target gave ``inf``.)

    >>> scores = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0], [-2.0, float("nan"), -1.0]])
    >>> reciprocal_rank(RewardInputs(torch.zeros(4, 1), torch.ones(4, 1), scores, torch.tensor([0, 2, 1, 0])))
    tensor([1.0000, 0.3333, 0.5000,    nan])
    """
    if inputs.candidate_scores is None or inputs.target_index is None:
        raise ValueError("reciprocal_rank needs candidate_scores and target_index (enable rank_candidates)")
    scores = inputs.candidate_scores
    target = scores.gather(1, inputs.target_index[:, None].long())
    at_least = (scores >= target).sum(-1) - 1  # the target itself is not a competitor
    rr = 1.0 / (1.0 + at_least.to(scores.dtype))
    return torch.where(torch.isnan(scores).any(-1), torch.full_like(rr, float("nan")), rr)


def candidate_log_softmax(inputs: RewardInputs) -> torch.Tensor:
    """Log-probability of the true item under a softmax over the sampled candidates' ``candidate_scores``.

    The continuous form of :func:`reciprocal_rank` (a sampled-softmax objective): it rewards pushing the
    target above the other candidates too, but moves with every change of the scores. The reciprocal rank of a
    target among a few random candidates is often the same for every member of a group -- small noise
    rarely reorders them -- which leaves the group without an advantage; this reward does not.

    >>> scores = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))
    >>> [round(x, 6) for x in candidate_log_softmax(RewardInputs(torch.zeros(2, 1), torch.ones(2, 1), scores,
    ...                                                          torch.tensor([0, 2]))).tolist()]
    [-0.693147, -0.510826]
    """
    if inputs.candidate_scores is None or inputs.target_index is None:
        raise ValueError("candidate_log_softmax needs candidate_scores and target_index (enable rank_candidates)")
    scores = inputs.candidate_scores.double()
    target = scores.gather(1, inputs.target_index[:, None].long()).squeeze(1)
    return target - torch.logsumexp(scores, dim=-1)


def _titles(inputs: RewardInputs, name: str) -> list[tuple[str, str]]:
    if inputs.sampled_titles is None or inputs.target_titles is None:
        raise ValueError(f"{name} rewards sampled titles: it needs rollout: generate")
    return list(zip(inputs.sampled_titles, inputs.target_titles, strict=True))


def exact_match(inputs: RewardInputs) -> torch.Tensor:
    """1 if the member sampled the true item's title, else 0 (titles compared exactly, as the trie spells them).

    >>> exact_match(RewardInputs(torch.zeros(2, 1), torch.ones(2, 1), sampled_titles=["Halo 3", "Halo"],
    ...                          target_titles=["Halo 3", "Halo 3"]))
    tensor([1., 0.], dtype=torch.float64)
    """
    # on the log-probs' device, as the other rewards: a CPU tensor beside them failed on a GPU (combine, gather)
    return torch.tensor([float(s == t) for s, t in _titles(inputs, "exact_match")], dtype=torch.float64,
                        device=inputs.token_logprobs.device)


_ARTICLES = frozenset({"a", "an", "the"})


def _words(title: str) -> list[str]:
    """SQuAD's answer normalisation for titles: case-folded, punctuation (any Unicode P* character) read as a
    word break -- "Halo 3: ODST" and "Halo 3 ODST" are the same words -- and the articles a/an/the dropped."""
    spaced = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in title.casefold())
    return [w for w in spaced.split() if w not in _ARTICLES]


def token_f1(inputs: RewardInputs) -> torch.Tensor:
    """F1 of the sampled title's words against the true title's (normalised as SQuAD's answers: case-folded,
    punctuation as word breaks, articles dropped; words counted with multiplicity): partial credit for a title
    that shares words with the true one. Two titles with no words left after normalising score 1 only if they
    are equal up to case.

    >>> token_f1(RewardInputs(torch.zeros(4, 1), torch.ones(4, 1),
    ...                       sampled_titles=["Halo 3", "Halo Wars", "Tetris", "The Halo (3): ODST"],
    ...                       target_titles=["Halo 3", "halo 3", "Halo 3", "Halo 3 ODST"]))
    tensor([1.0000, 0.5000, 0.0000, 1.0000], dtype=torch.float64)
    """
    from collections import Counter

    out = []
    for sampled, target in _titles(inputs, "token_f1"):
        a, b = Counter(_words(sampled)), Counter(_words(target))
        if not a and not b:
            out.append(float(sampled.casefold() == target.casefold()))
            continue
        common = sum((a & b).values())
        if common == 0:
            out.append(0.0)
            continue
        precision, recall = common / sum(a.values()), common / sum(b.values())
        out.append(2 * precision * recall / (precision + recall))
    return torch.tensor(out, dtype=torch.float64, device=inputs.token_logprobs.device)


REWARD_FUNCTIONS: dict[str, Callable[[RewardInputs], torch.Tensor]] = {
    "neg_ppl": neg_ppl,
    "log_likelihood": log_likelihood,
    "reciprocal_rank": reciprocal_rank,
    "candidate_log_softmax": candidate_log_softmax,
    "exact_match": exact_match,
    "token_f1": token_f1,
}
# Rewards that score a sampled candidate set (rank_candidates) under each member's latent.
RANK_REWARDS = frozenset({"reciprocal_rank", "candidate_log_softmax"})
# Rewards of the titles members sample (rollout: generate), the vanilla GRPO the paper compares against.
GENERATION_REWARDS = frozenset({"exact_match", "token_f1"})


def combine_rewards(per_function: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of the rewards (``sum_k w_k r_k``); a NaN/inf in any term makes the member's total non-finite.

    >>> combine_rewards({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 0.0])}, {"a": 1.0, "b": 0.5})
    tensor([6., 2.])
    """
    total = None
    for name, values in per_function.items():
        term = weights[name] * values
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no reward function")
    return total
