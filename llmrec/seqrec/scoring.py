"""Full-catalogue scoring of raw histories by a trained ID model (evaluation, D3 guidance, recommend)."""

from __future__ import annotations

import torch

from llmrec.seqrec.data import left_pad


def score_histories(
    model: torch.nn.Module,
    histories: list[list[int]],
    max_history: int,
    device: torch.device | str,
    mask_history: bool = False,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, N]`` float scores (column ``j`` = item ``j + 1``) of the item ids after each history.

    Histories are left-padded (or cut to their last ``max_history`` items) as in training. With
    ``mask_history`` the history items the model reads (the last ``max_history``) score ``-inf``, as the trainer
    masks them (the seqrec run's option; the evaluator's rows are already cut to ``max_history``).
    ``keys`` (one int64 per history, e.g. :func:`history_keys`): the draws of a LARES whose initial state is random
    at evaluation (``state_init: normal``); without them a random state comes from the global generator, so the
    scores would depend on the call. Other models ignore them.

    >>> from llmrec.seqrec.models import SASRec
    >>> from llmrec.seqrec.modules import Backbone
    >>> model = SASRec(Backbone(num_items=5, max_len=4, hidden=8, heads=2, inner=16)).eval()
    >>> s = score_histories(model, [[1, 2], [3]], 4, "cpu", mask_history=True)
    >>> s.shape, s[0, :2].tolist()
    (torch.Size([2, 5]), [-inf, -inf])
    """
    from llmrec.seqrec.models import LARES

    _check_item_ids(histories, model.backbone.num_items, "history")
    ids = torch.from_numpy(left_pad(histories, max_history)).to(device)
    kw = {"keys": keys.to(ids.device)} if keys is not None and isinstance(model, LARES) else {}
    with torch.no_grad():
        scores = model.score(ids, **kw).float()
    if mask_history:
        mask_items(scores, [h[-max_history:] for h in histories])
    return scores


def history_keys(histories: list[list[int]], max_history: int, *key: int) -> torch.Tensor:
    """One int64 key per history from the items the model reads (its last ``max_history``) and ``key``: the same
    history gets the same random draws whatever else is scored with it.

    >>> a, b = history_keys([[1, 2, 3], [9, 2, 3]], 2), history_keys([[2, 3]], 2)
    >>> bool(a[0] == a[1] == b[0])
    True
    """
    from llmrec.seqrec.keyed_random import mix

    return torch.tensor([mix(*key, len(h[-max_history:]), *h[-max_history:]) for h in histories], dtype=torch.long)


def _check_item_ids(rows, num_items: int, what: str) -> None:
    """Every id of every row in ``1..num_items`` and no row empty: id 0 is padding (a history of only padding, or
    column -1, i.e. the last item, in :func:`mask_items`), larger ids are not in the catalogue. The callers check
    their inputs first; these public helpers must not turn a bad id into another item's score."""
    for row, items in enumerate(rows):
        if what == "history" and not len(items):
            raise ValueError(f"{what} {row} is empty: an ID model needs at least one item to score from")
        bad = [i for i in items if not 1 <= int(i) <= num_items]
        if bad:
            raise ValueError(f"{what} {row} holds item id {bad[0]}, outside the catalogue's 1..{num_items}")


def mask_items(scores: torch.Tensor, items_per_row) -> torch.Tensor:
    """Set ``scores[row, item - 1]`` to -inf for every item id of each row's collection (in place; returned)."""
    _check_item_ids(items_per_row, scores.shape[1], "masked row")
    for row, items in enumerate(items_per_row):
        if items:
            scores[row, torch.tensor(sorted(set(items)), device=scores.device) - 1] = float("-inf")
    return scores


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best ``(values, columns)`` per row; equal scores rank the smaller item id first.

    The stable descending sort gives the same order as :func:`llmrec.evaluation.metrics.ranks_from_scores`
    counts ranks, so a list and its reported rank never disagree on ties. NaN scores are refused: a descending
    sort puts them first, where ``ranks_from_scores`` never counts them as higher, so list and rank would disagree
    (and a model that scores NaN is broken, not ranking).
    """
    if torch.isnan(scores).any():
        rows = torch.isnan(scores).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"the model scored NaN for {len(rows)} of {scores.shape[0]} histories (first: batch row "
                         f"{rows[0]}): its weights or inputs are not finite")
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], order[:, :k]
