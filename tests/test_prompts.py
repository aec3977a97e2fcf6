"""Prompt templates: verbatim D3 text, clean template, chat wrapping, fitting to a token budget,
and that the shipped templates and recipes are found from a regular (non-editable) install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llmrec.prompts import PromptError, PromptTemplate, encode, render_example, render_to_fit, wrap_chat
from llmrec.resources import resource_dir

REPO = Path(__file__).resolve().parents[1]

# The D3 / BIGRec / LatentR3 prompt (../shared/papers/latentr3.md, section 1), typos and the trailing
# spaces after "request.", "User Input:" and "Response:" included.
D3_EXPECTED = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    "### Instruction:\n"
    "Given a list of video games the user recetenly enjoy, please write a new video games that the user may bought\n"
    "### User Input: \n"
    'The user has palyed the following video gamess before: "Anno 2070", "Monopoly Tycoon - PC"\n'
    "\n"
    "### Response: \n"
)

CLEAN_EXPECTED = (
    'A user bought the following video games, oldest first: "Anno 2070", "Monopoly Tycoon - PC"\n'
    "Recommend the next one of the video games the user will buy. Answer with its exact title in quotes.\n"
    "Next item: "
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from llmrec.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer("tiny-qwen2")


@pytest.fixture(scope="module")
def llama_tokenizer():
    from llmrec.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer("tiny-llama")


def test_d3_template_is_verbatim():
    tpl = PromptTemplate.load("d3")
    assert tpl.name == "d3" and tpl.answer_prefix == "### Response: \n"
    assert tpl.render_prompt(["Anno 2070", "Monopoly Tycoon - PC"], noun="video games") == D3_EXPECTED
    assert tpl.render_completion("Point of Know Return") == '"Point of Know Return"\n'
    musics = tpl.render_prompt(["Kansas"], noun="musics")
    assert 'the following musicss before: "Kansas"\n' in musics
    assert musics.startswith("Below is an instruction") and musics.endswith("### Response: \n")


def test_clean_template():
    tpl = PromptTemplate.load("clean")
    assert tpl.render_prompt(["Anno 2070", "Monopoly Tycoon - PC"], noun="video games") == CLEAN_EXPECTED
    assert tpl.render_completion("Halo") == '"Halo"\n'


def test_render_example_and_empty_history():
    tpl = PromptTemplate.load("d3")
    ex = render_example(tpl, ["Anno 2070", "Monopoly Tycoon - PC"], "Halo", noun="video games")
    assert ex == {"prompt": D3_EXPECTED, "completion": '"Halo"\n'}
    assert render_example(tpl, ["A"], None)["completion"] == ""
    with pytest.raises(PromptError, match="empty history"):
        tpl.render_prompt([])


def test_titles_with_braces_and_placeholders_stay_literal():
    tpl = PromptTemplate.load("d3")
    titles = ["{noun} {history}", "Set {0} of {1}", "}{", "Weird {title} name"]
    out = tpl.render_prompt(titles, noun="games")
    assert ('before: "{noun} {history}", "Set {0} of {1}", "}{", "Weird {title} name"\n') in out
    assert tpl.render_completion("{title} {0}") == '"{title} {0}"\n'


def test_chat_wrapping(tokenizer):
    tpl = PromptTemplate.load("d3")
    with pytest.raises(PromptError, match="no chat template"):
        wrap_chat(tokenizer, "hi")
    chat_tok = _with_chat_template(tokenizer)
    assert wrap_chat(chat_tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ex = render_example(tpl, ["Anno 2070", "Monopoly Tycoon - PC"], "Halo", noun="video games", tokenizer=chat_tok,
                        use_chat_template=True)
    assert ex["prompt"] == f"<|im_start|>user\n{D3_EXPECTED}<|im_end|>\n<|im_start|>assistant\n"
    assert ex["completion"] == '"Halo"\n'


def _with_chat_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _n_tokens(tokenizer, ex: dict) -> int:
    return len(encode(tokenizer, ex["prompt"], first=True)) + len(encode(tokenizer, ex["completion"], first=False)) + 1


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_render_to_fit_truncates_history_from_the_left(tokenizer, llama_tokenizer, kind):
    tok = tokenizer if kind == "qwen" else llama_tokenizer
    tpl = PromptTemplate.load("d3")
    history = [f"Super Mario Zelda {i}" for i in range(12)]
    target = "Halo Tetris Deluxe Edition"
    full, dropped = render_to_fit(tpl, tok, history, target, max_length=10_000, noun="video games")
    assert dropped == 0 and full == render_example(tpl, history, target, "video games")
    budget = _n_tokens(tok, full) - 15
    ex, dropped = render_to_fit(tpl, tok, history, target, max_length=budget, noun="video games")
    assert dropped > 0
    kept = history[dropped:]  # the oldest items go first
    assert ex == render_example(tpl, kept, target, "video games")
    assert ex["completion"] == '"Halo Tetris Deluxe Edition"\n'  # the answer is never cut
    assert _n_tokens(tok, ex) <= budget
    # maximal: one more (older) history item would not fit
    assert _n_tokens(tok, render_example(tpl, history[dropped - 1:], target, "video games")) > budget
    # without a target only the prompt counts
    ex2, dropped2 = render_to_fit(tpl, tok, history, None, max_length=budget, noun="video games")
    assert ex2["completion"] == "" and dropped2 <= dropped
    assert len(encode(tok, ex2["prompt"], first=True)) <= budget


def test_render_to_fit_with_chat_template(tokenizer):
    tok = _with_chat_template(tokenizer)
    tpl = PromptTemplate.load("clean")
    history = [f"Street Fighter {i}" for i in range(10)]
    full, _ = render_to_fit(tpl, tok, history, "Kirby", max_length=10_000, use_chat_template=True)
    budget = _n_tokens(tok, full) - 8
    ex, dropped = render_to_fit(tpl, tok, history, "Kirby", max_length=budget, use_chat_template=True)
    assert dropped > 0 and ex["prompt"].startswith("<|im_start|>user\n")
    assert ex["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert f'"Street Fighter {dropped}"' in ex["prompt"] and f'"Street Fighter {dropped - 1}"' not in ex["prompt"]
    assert _n_tokens(tok, ex) <= budget


def test_render_to_fit_error_when_one_item_does_not_fit(tokenizer):
    tpl = PromptTemplate.load("d3")
    with pytest.raises(PromptError, match="single history item and its answer needs .* > max_length 20"):
        render_to_fit(tpl, tokenizer, ["Halo", "Tetris"], "Zelda", max_length=20)
    # an answer longer than the budget is refused, not truncated
    one, _ = render_to_fit(tpl, tokenizer, ["Halo"], "Zelda", max_length=10_000)
    with pytest.raises(PromptError):
        render_to_fit(tpl, tokenizer, ["Halo"], "Zelda " * 50, max_length=_n_tokens(tokenizer, one))


# --------------------------------------------------------------------------- template files


def _template(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mine.txt"
    p.write_text(text, encoding="utf-8")
    return p


def test_custom_template_file(tmp_path: Path):
    p = _template(tmp_path, "---\nhistory_item: '<{title}>'\nhistory_separator: ' | '\ncompletion: '{title}'\n"
                            "answer_prefix: 'A: '\n---\nItems ({noun}): {history}\nA: ")
    tpl = PromptTemplate.load(str(p))
    assert tpl.name == "mine"
    assert tpl.render_prompt(["x", "y"], "toys") == "Items (toys): <x> | <y>\nA: "
    assert tpl.render_completion("z") == "z"



def test_a_template_with_windows_line_endings_reads_as_with_plain_ones(tmp_path: Path):
    """A file saved with CRLF was refused as having no front matter block."""
    text = (Path(__file__).resolve().parents[1] / "prompts" / "d3.txt").read_text(encoding="utf-8")
    p = tmp_path / "crlf.txt"
    p.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    crlf, plain = PromptTemplate.load(str(p)), PromptTemplate.load("d3")
    assert crlf.render_prompt(["Halo"], "games") == plain.render_prompt(["Halo"], "games")
    assert crlf.answer_prefix == plain.answer_prefix

@pytest.mark.parametrize(
    "text, message",
    [
        ("no front matter {history}", "front matter"),
        ("---\nhistory_item: [\n---\n{history}", "bad front matter"),
        ("---\ncolour: red\n---\n{history}", r"unknown front matter keys \['colour'\]"),
        ("---\ndescription: x\n---\nno placeholder", "no {history} placeholder"),
        ("---\nanswer_prefix: 'Out: '\n---\n{history}\nIn: ", "does not end with answer_prefix"),
        # a typo'd placeholder made every answer / history item one literal text, trained on silently (review)
        ("---\ncompletion: '\"{titel}\"'\n---\n{history}", r"completion .* has no \{title\} placeholder"),
        ("---\nhistory_item: '{name}'\n---\n{history}", r"history_item .* has no \{title\} placeholder"),
        ("---\ncompletion: null\n---\n{history}", r"\['completion'\] must be text"),
        ("---\nhistory_item: 5\n---\n{history}", r"\['history_item'\] must be text"),
        ("---\n- a list\n---\n{history}", "must be key: value lines"),
    ],
)
def test_bad_template_files(tmp_path: Path, text: str, message: str):
    with pytest.raises(PromptError, match=message):
        PromptTemplate.load(str(_template(tmp_path, text)))


def test_unknown_template_name_lists_shipped():
    with pytest.raises(PromptError, match=r"'nope' not found \(shipped: clean, d3"):
        PromptTemplate.load("nope")


# --------------------------------------------------------------------------- regular install


def test_wheel_ships_templates_and_recipes(tmp_path: Path):
    """A wheel (hence a regular install) carries prompts/ and recipes/ in llmrec/_resources."""
    src = tmp_path / "src"
    # build from a copy: building in place would write build/ and egg-info into the working tree
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             "_resources", ".pytest_cache", ".ruff_cache", "runs",
                                                             "outputs", ".hypothesis"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (whl,) = wheels.glob("llmrec-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert "llmrec/_resources/prompts/d3.txt" in names
    assert "llmrec/_resources/prompts/clean.txt" in names
    assert "llmrec/_resources/recipes/games/eval.yaml" in names
    assert zipfile.ZipFile(whl).read("llmrec/_resources/prompts/d3.txt") == (REPO / "prompts" / "d3.txt").read_bytes()
    # installed (not editable) into a plain folder, the package finds them without the source tree
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "-q", "--target", str(target), str(whl)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import llmrec, llmrec.resources as r\n"
        "from llmrec.prompts import PromptTemplate\n"
        "from llmrec.config import read_recipe\n"
        "t = PromptTemplate.load('d3')\n"
        "print(llmrec.__file__)\n"
        "print(r.resource_dir('prompts'))\n"
        "print(read_recipe('recipes/games/eval.yaml')['prompt'])\n"
        "print(repr(t.render_prompt(['A'], 'toys')[-15:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1] == str(target / "llmrec" / "_resources" / "prompts")
    assert lines[2] == "d3" and lines[3] == repr("### Response: \n")


def test_evaluation_prompts_are_cut_without_looking_at_the_answer(tokenizer):
    """prompt_fit longest_answer: two rows with the same history get the same prompt whatever their answers, also
    when the history must be cut (the budget reserves a fixed answer length, not the row's own)."""
    from types import SimpleNamespace

    from llmrec.decoding.search import render_prompts

    tpl = PromptTemplate.load("d3")
    history = [f"Super Mario Zelda {i}" for i in range(12)]
    rows = [{"history_titles": history, "target_title": "Halo"},
            {"history_titles": history, "target_title": "Halo Tetris Deluxe Edition Collection Gold Dark Souls"}]
    full = render_example(tpl, history, None, "video games")["prompt"]
    cfg = SimpleNamespace(max_prompt_length=len(encode(tokenizer, full, first=True)) + 10, noun="video games",
                          use_chat_template=False, prompt_fit="longest_answer")
    short, long = render_prompts(tpl, tokenizer, rows, cfg, reserved=30)
    assert short == long and short != full and short.startswith(full[:20])
    assert len(encode(tokenizer, short, first=True)) <= cfg.max_prompt_length - 30
    # the default, own_answer, fits each row with its own answer: the long answer's row keeps less history
    cfg.prompt_fit = "own_answer"
    short, long = render_prompts(tpl, tokenizer, rows, cfg, reserved=30)
    assert len(encode(tokenizer, long, first=True)) < len(encode(tokenizer, short, first=True))


def test_a_chat_template_that_writes_the_bos_token_gives_one_bos():
    """Llama 3 style templates write BOS themselves: encoding the wrapped prompt added a second one."""
    from llmrec.models.tiny import build_tiny_tokenizer
    from llmrec.prompts import encode, wrap_chat

    tok = build_tiny_tokenizer("tiny-llama")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = encode(tok, wrap_chat(tok, "Halo"), first=True)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert encode(tok, "Halo", first=True)[0] == tok.bos_token_id  # a plain prompt still gets its BOS


def test_the_trie_renders_completions_as_training_does():
    """A literal brace in a completion format: SFT's render_completion keeps it, the trie's str.format raised."""
    from llmrec.decoding.trie import TitleTrie
    from llmrec.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer("tiny-qwen2")
    trie = TitleTrie(tok, ["Halo", "Tetris"], [1, 2], context_prefix="### Response: \n",
                     completion_format='{"title": "{title}"}\n')
    want = tok('{"title": "Halo"}\n', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert trie.title_token_ids[0] == want


def test_own_answer_evaluation_keeps_the_history_sft_kept_for_a_latent_model():
    """own_answer fitted the prompt in the whole budget, SFT/GRPO in the budget minus the latent tokens: near the
    budget a latent model was evaluated with one more history item than it was trained with."""
    from types import SimpleNamespace

    from llmrec.decoding.search import render_prompts
    from llmrec.models.tiny import build_tiny_tokenizer
    from llmrec.training.sft import encode_example

    tok, tpl = build_tiny_tokenizer("tiny-llama"), PromptTemplate.load("d3")
    row = {"history_titles": ["Halo", "Tetris", "Kirby", "Minecraft", "Zelda"], "target_title": "Pokemon Red"}
    checked = 0
    for budget in range(120, 260):
        try:
            sft_prompt, _, _ = encode_example(tpl, tok, row["history_titles"], row["target_title"], budget,
                                              "video games", num_latent_tokens=1)
        except PromptError:
            continue
        cfg = SimpleNamespace(prompt_fit="own_answer", max_prompt_length=budget, noun="video games",
                              use_chat_template=False)
        (prompt,) = render_prompts(tpl, tok, [row], cfg, reserved=99, latent_tokens=1)
        assert encode(tok, prompt, first=True) == sft_prompt, budget
        checked += 1
    assert checked > 50


def test_a_shipped_name_wins_over_a_file_or_folder_of_that_name(tmp_path, monkeypatch):
    """A `d3/` folder in the working directory broke every recipe's default `prompt: d3` (IsADirectoryError)."""
    shipped = PromptTemplate.load("d3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d3").mkdir()
    assert PromptTemplate.load("d3") == shipped
    (tmp_path / "mine.txt").write_text((resource_dir("prompts") / "clean.txt").read_text())
    assert PromptTemplate.load("mine.txt").body == PromptTemplate.load("clean").body
    with pytest.raises(PromptError, match="is not a file"):
        PromptTemplate.load("./d3")


def test_placeholders_in_the_noun_or_titles_stay_text():
    # The noun was put in first and the history second, so a noun holding "{history}" got the history inside it.
    tpl = PromptTemplate.load("d3")
    plain = tpl.render_prompt(["Halo {noun}", "Pong {history}"], noun="games")
    assert "Halo {noun}" in plain and "Pong {history}" in plain
    odd = tpl.render_prompt(["Halo"], noun="{history} games")
    assert odd == tpl.render_prompt(["Halo"], noun="GAMES").replace("GAMES", "{history} games")
