"""D3 decoding: guidance of the constrained beam search by an ID model (the "text-free assistant")."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

# The same prompts and title vocabulary as the unguided decoding tests.
from conftest import train_tiny_sasrec
from test_decoding import PREFIX, PROMPTS, WORDS

from llmrec.decoding.beam_search import constrained_beam_search, reference_constrained_beam_search
from llmrec.decoding.guidance import (
    ItemMassIndex,
    TitleGuidance,
    item_log_probs_from_scores,
    load_guidance_model,
)
from llmrec.decoding.trie import TitleTrie
from llmrec.models.tiny import build_tiny


@pytest.fixture(scope="module", params=["tiny-qwen2", "tiny-llama"])
def tiny(request):
    return build_tiny(request.param)


@pytest.fixture(scope="module")
def tiny_qwen():
    return build_tiny("tiny-qwen2")


def random_catalogue(seed: int, n: int) -> tuple[list[str], list[int]]:
    """Random titles, with titles shared by several items and titles that are prefixes of others;
    item ids shuffled and not contiguous (column i of the probability vectors is item i)."""
    rng = random.Random(seed)
    titles = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    titles += [titles[0], titles[0], titles[1] + " 2", titles[2] + " Deluxe Edition", titles[3]]
    ids = rng.sample(range(1, 3 * len(titles)), len(titles))
    return titles, ids


def random_item_log_probs(seed: int, rows: int, width: int, zeros: bool = True) -> torch.Tensor:
    """``[rows, width]`` item log-probs (softmax of random scores, some items at probability 0)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, width, generator=g) * 3
    if zeros:
        scores[torch.rand(rows, width, generator=g) < 0.2] = float("-inf")
    scores[:, 0] = float("-inf")
    return torch.log_softmax(scores, dim=-1)


def title_log_prob(trie: TitleTrie, item_lp: torch.Tensor, t: int) -> float:
    """log P_ID(title t) = log of the summed probability of its items, over the catalogue's items."""
    p = item_lp.double().exp()
    catalogue = sum(float(p[i]) for i in trie.item_to_title)
    return math.log(sum(float(p[i]) for i in trie.title_item_ids[t]) / catalogue)


def encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def teacher_forced_logprob(model, tok, prompt, path):
    p = tok(prompt, return_tensors="pt").input_ids
    ids = torch.cat([p, torch.tensor([path])], dim=1)
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    return logp[p.shape[1] - 1 : -1].gather(1, torch.tensor(path)[:, None]).sum().item()


# --------------------------------------------------------------------------------------- node mass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_mass_equals_a_python_sum(tiny_qwen, seed):
    _, tok = tiny_qwen
    titles, ids = random_catalogue(seed, 30)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    index = ItemMassIndex(trie)
    lp = random_item_log_probs(seed, 3, max(ids) + 5)
    # Plain Python: walk each item's title path, add its probability to every node on it (root included).
    want = [[0.0] * trie.num_nodes for _ in range(3)]
    for item, t in trie.item_to_title.items():
        node = 0
        path = [0]
        for token in trie.title_token_ids[t]:
            toks, kids = trie.children(node)
            node = kids[toks.index(token)]
            path.append(node)
        for r in range(3):
            for n in path:
                want[r][n] += math.exp(float(lp[r, item]))
    got = index.mass(lp.exp())
    assert got.shape == (3, trie.num_nodes)
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5, atol=1e-7)
    log_mass = index.log_mass(lp)
    finite = torch.tensor(want) > 0
    assert torch.allclose(log_mass[finite], torch.tensor(want).log()[finite], atol=1e-5)
    assert torch.isneginf(log_mass[~finite]).all()  # nodes whose items all have probability 0
    # Shared titles sum on one path; the root holds the whole catalogue; children split their parent.
    assert index.pair_node.numel() == sum(len(trie.title_token_ids[t]) + 1 for t in trie.item_to_title.values())
    for n in range(trie.num_nodes):
        kids = trie.children(n)[1]
        if kids:
            assert float(got[0, kids].sum()) == pytest.approx(float(got[0, n]), rel=1e-5, abs=1e-7)


def test_node_mass_input_errors(tiny_qwen):
    _, tok = tiny_qwen
    trie = TitleTrie(tok, ["Halo", "Zelda"], [3, 7], context_prefix=PREFIX)
    index = ItemMassIndex(trie)
    with pytest.raises(ValueError, match="column i is item i"):
        index.log_mass(torch.zeros(2, 7))  # item 7 needs 8 columns
    with pytest.raises(ValueError, match=">= 0"):
        TitleGuidance(torch.zeros(1, trie.num_nodes), -1.0)
    lp = item_log_probs_from_scores(torch.tensor([[0.0, 1.0, 2.0]]))
    assert lp.shape == (1, 4) and torch.isneginf(lp[0, 0]) and float(lp[0, 1:].exp().sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("weight", [float("inf"), float("nan")])
def test_an_infinite_or_nan_guidance_weight_is_refused(prepared_dir, tmp_path, weight):
    """inf * 0 (a step that keeps the whole item mass) is NaN: an inf weight lost every beam and ranked nothing."""
    with pytest.raises(ValueError, match="guidance weight must be a finite number"):
        TitleGuidance(torch.zeros(1, 3), weight)
    with pytest.raises(ValueError, match="guidance_weight must be a finite number"):
        _eval_config(prepared_dir, tmp_path / "x", guidance_checkpoint=str(tmp_path / "sasrec"), guidance_weight=weight)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ guided search


def test_weight_zero_is_the_unguided_search(tiny):
    model, tok = tiny
    titles, ids = random_catalogue(3, 40)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    guidance = TitleGuidance.from_item_log_probs(ItemMassIndex(trie), random_item_log_probs(3, 3, max(ids) + 1), 0.0)
    input_ids, mask = encode(tok, PROMPTS)
    for lp in (1.0, 0.0):
        plain = constrained_beam_search(model, trie, input_ids, mask, num_beams=5, length_penalty=lp)
        zero = constrained_beam_search(model, trie, input_ids, mask, num_beams=5, length_penalty=lp, guidance=guidance)
        for a, b in zip(plain, zero, strict=True):
            assert a.hypotheses == b.hypotheses and a.item_ranking == b.item_ranking  # bit for bit


@pytest.mark.parametrize("early_stopping", [True, False])
@pytest.mark.parametrize(
    "seed,n_titles,num_beams,length_penalty,weight",
    [(0, 40, 4, 1.0, 1.0), (1, 60, 6, 0.0, 0.5), (2, 80, 5, 1.0, 3.0), (3, 30, 4, 0.0, 2.0)],
)
def test_guided_search_matches_generate_with_a_logits_processor(tiny, seed, n_titles, num_beams, length_penalty, weight,
                                                                early_stopping):
    """Our tensor search with guidance == transformers' generate with the guidance as a LogitsProcessor (either
    early_stopping), and every returned score == (teacher-forced LM log-prob + w * log P_ID(title)) / L**lp."""
    model, tok = tiny
    titles, ids = random_catalogue(seed, n_titles)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    item_lp = random_item_log_probs(seed, len(PROMPTS), max(ids) + 1)
    guidance = TitleGuidance.from_item_log_probs(ItemMassIndex(trie), item_lp, weight)
    input_ids, mask = encode(tok, PROMPTS)
    ours = constrained_beam_search(model, trie, input_ids, mask, num_beams=num_beams,
                                   length_penalty=length_penalty, guidance=guidance, early_stopping=early_stopping)
    ref = reference_constrained_beam_search(model, trie, input_ids, mask, num_beams=num_beams,
                                            length_penalty=length_penalty, guidance=guidance,
                                            early_stopping=early_stopping)
    plain = constrained_beam_search(model, trie, input_ids, mask, num_beams=num_beams, length_penalty=length_penalty)
    assert any(o.title_ranking != p.title_ranking for o, p in zip(ours, plain, strict=True))  # guidance matters
    for r, (prompt, o, h) in enumerate(zip(PROMPTS, ours, ref, strict=True)):
        assert len(o.hypotheses) == num_beams
        assert o.title_ranking == h.title_ranking and o.item_ranking == h.item_ranking
        for (_, so), (_, sh) in zip(o.hypotheses, h.hypotheses, strict=True):
            assert so == pytest.approx(sh, abs=1e-4)
        for t, s in o.hypotheses:
            path = trie.title_token_ids[t]
            want = teacher_forced_logprob(model, tok, prompt, path) + weight * title_log_prob(trie, item_lp[r], t)
            assert s == pytest.approx(want / len(path) ** length_penalty, abs=1e-4)


def test_large_weight_ranks_by_the_id_models_title_mass(tiny):
    """With w huge the LM hardly counts: titles come out in the ID model's order of title mass. The masses
    are geometric with ratio 1/3 (each title outweighs all lighter ones together), so a node's mass ranks
    it like its heaviest title and beam search with lp=0 returns exactly the B heaviest titles, in order."""
    model, tok = tiny
    titles, ids = random_catalogue(7, 40)
    trie = TitleTrie(tok, titles, ids, context_prefix=PREFIX)
    width = max(ids) + 1
    item_lp = torch.full((len(PROMPTS), width), float("-inf"))
    orders = []
    for r in range(len(PROMPTS)):
        order = list(range(trie.num_titles))
        random.Random(r).shuffle(order)
        orders.append(order)
        for rank, t in enumerate(order):
            items = trie.title_item_ids[t]
            for i in items:
                item_lp[r, i] = -rank * math.log(3.0) - math.log(len(items))  # shared titles sum up
    item_lp = torch.log_softmax(item_lp, dim=-1)
    guidance = TitleGuidance.from_item_log_probs(ItemMassIndex(trie), item_lp, 1e4)
    out = constrained_beam_search(model, trie, *encode(tok, PROMPTS), num_beams=6, length_penalty=0.0, guidance=guidance)
    for order, o in zip(orders, out, strict=True):
        assert o.title_ranking == order[:6]
        assert o.item_ranking == trie.items_for_titles(order[:6])


def test_guidance_shape_is_checked(tiny_qwen):
    model, tok = tiny_qwen
    trie = TitleTrie(tok, ["Halo", "Zelda"], [1, 2], context_prefix=PREFIX)
    guidance = TitleGuidance(torch.zeros(1, trie.num_nodes), 1.0)
    with pytest.raises(ValueError, match="rows x trie nodes"):
        constrained_beam_search(model, trie, *encode(tok, PROMPTS), num_beams=2, guidance=guidance)


# --------------------------------------------------------------------------------------- evaluator


@pytest.fixture
def sasrec_run(prepared_dir, tmp_path) -> Path:
    return train_tiny_sasrec(prepared_dir, tmp_path / "sasrec")


def _eval_config(data: Path, out: Path, **kw):
    from llmrec.evaluation.evaluator import EvalConfig

    base = dict(dataset=str(data), split="test", method="beam", model_name_or_path="tiny-qwen2", dtype="float32",
                prompt="d3", noun="video games", num_beams=4, batch_size=3, ks=[1, 3], output_dir=str(out),
                history_length=3)
    base.update(kw)
    return EvalConfig(**base)


def test_evaluator_with_guidance_from_a_trained_sasrec(prepared_dir, sasrec_run, tmp_path):
    from llmrec.data.canonical import load_prepared
    from llmrec.decoding.search import build_catalog_trie, encode_prompts, render_prompts
    from llmrec.evaluation.evaluator import evaluate
    from llmrec.prompts import PromptTemplate
    from llmrec.seqrec.data import left_pad

    res = evaluate(_eval_config(prepared_dir, tmp_path / "guided", guidance_checkpoint=str(sasrec_run),
                                guidance_weight=2.0))
    g = res["protocol"]["guidance"]
    assert g["checkpoint"] == str(sasrec_run) and g["weight"] == 2.0
    assert g["id_model"] == "sasrec" and g["id_max_history"] == 5 and g["id_weights"] == "train/best.safetensors"
    assert "D3 guidance" in res["name"]
    saved = json.loads((tmp_path / "guided" / "results.json").read_text())
    assert saved["protocol"]["guidance"] == g
    guided = [json.loads(x) for x in (tmp_path / "guided" / "rankings.jsonl").read_text().splitlines()]

    # The same rankings by hand: the ID model reads up to ITS max_history (5), the prompt only 3 items.
    id_model, info = load_guidance_model(sasrec_run)
    data = load_prepared(prepared_dir, splits=["test"], max_history=3)
    full = load_prepared(prepared_dir, splits=["test"], max_history=5, with_titles=False)
    model, tok = build_tiny("tiny-qwen2")
    template = PromptTemplate.load("d3")
    trie = build_catalog_trie(data.catalog, tok, template)
    cfg = _eval_config(prepared_dir, tmp_path / "unused")
    rows = [0, 1, 2]
    ids, mask = encode_prompts(tok, render_prompts(template, tok, [data.splits["test"][i] for i in rows], cfg), "cpu")
    hist = torch.from_numpy(left_pad([full.splits["test"][i]["history_item_ids"] for i in rows], info["max_history"]))
    guidance = TitleGuidance.from_item_log_probs(ItemMassIndex(trie), item_log_probs_from_scores(id_model.score(hist)), 2.0)
    outs = constrained_beam_search(model, trie, ids, mask, num_beams=4, guidance=guidance)
    assert [o.item_ranking for o in outs] == [r["item_ranking"] for r in guided[:3]]
    for o, r in zip(outs, guided[:3], strict=True):
        assert [round(s, 6) for _, s in o.hypotheses] == pytest.approx(r["scores"], abs=1e-5)

    # Weight 0 is the plain evaluation (no guidance in the protocol, so the same fingerprint).
    plain = evaluate(_eval_config(prepared_dir, tmp_path / "plain"))
    zero = evaluate(_eval_config(prepared_dir, tmp_path / "zero", guidance_checkpoint=str(sasrec_run),
                                 guidance_weight=0.0))
    assert "guidance" not in zero["protocol"] and zero["fingerprint"] == plain["fingerprint"]
    assert (tmp_path / "zero" / "rankings.jsonl").read_text() == (tmp_path / "plain" / "rankings.jsonl").read_text()
    unguided = [json.loads(x) for x in (tmp_path / "plain" / "rankings.jsonl").read_text().splitlines()]
    assert [r["item_ranking"] for r in unguided] != [r["item_ranking"] for r in guided]


def test_guidance_checkpoint_errors(prepared_dir, sasrec_run, tmp_path):
    from conftest import write_prepared

    from llmrec.evaluation.evaluator import evaluate
    from llmrec.models.checkpoint import CheckpointError

    assert _eval_config(prepared_dir, tmp_path / "x", ks=[3, 1, 3]).ks == [1, 3]  # the config still normalises ks
    with pytest.raises(ValueError, match="method=beam"):
        _eval_config(prepared_dir, tmp_path / "x", method="popularity", guidance_checkpoint=str(sasrec_run))
    with pytest.raises(ValueError, match="guidance_weight"):
        _eval_config(prepared_dir, tmp_path / "x", guidance_checkpoint=str(sasrec_run), guidance_weight=-1.0)
    with pytest.raises(CheckpointError, match="not found"):
        evaluate(_eval_config(prepared_dir, tmp_path / "e0", guidance_checkpoint=str(tmp_path / "nope")))
    no_results = tmp_path / "no_results"
    shutil.copytree(sasrec_run, no_results)
    (no_results / "results.json").unlink()
    with pytest.raises(CheckpointError, match="results.json is missing"):
        evaluate(_eval_config(prepared_dir, tmp_path / "e1", guidance_checkpoint=str(no_results)))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(sasrec_run, no_weights)
    (no_weights / "train" / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"train/best.safetensors are missing"):
        evaluate(_eval_config(prepared_dir, tmp_path / "e2", guidance_checkpoint=str(no_weights)))
    # A catalogue of another size, or of the same size with other titles: refused before anything is written.
    smaller = write_prepared(tmp_path / "smaller", n_items=25)
    with pytest.raises(ValueError, match="catalogue of 30 items, but the evaluated catalogue has 25"):
        evaluate(_eval_config(smaller, tmp_path / "e3", guidance_checkpoint=str(sasrec_run)))
    other = write_prepared(tmp_path / "other", n_items=30, seed=5)
    with pytest.raises(ValueError, match="catalogue differs"):
        evaluate(_eval_config(other, tmp_path / "e4", guidance_checkpoint=str(sasrec_run)))
    for name in ("e0", "e1", "e2", "e3", "e4"):
        assert not (tmp_path / name).exists()
