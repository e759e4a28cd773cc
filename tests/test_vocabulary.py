"""Models whose vocabularies differ: ``merge.tokenizer`` (base, union, models[i]),
``missing_tokens``, ``pad_to_multiple_of``, ``tie_word_embeddings``, ``[merge.tokens]`` and
``chat_template``, on real tokenizers and really resized models.

The zoo (built once for this module, float32 so the comparisons with mergekit can be exact):

- ``base``: a tiny Llama with the demo's character tokenizer (53 tokens, 53 rows);
- ``chat``: added ``<|im_start|>`` and ``<|im_end|>`` as special tokens, set a chat template and
  resized its embeddings (55 rows), as a chat fine-tune does;
- ``pad``: added a new pad token ``<pad2>`` (``add_special_tokens``) and resized with
  ``pad_to_multiple_of=8``: 54 tokens in 56 rows;
- ``domain``: a retrained vocabulary with one more regular token (``ing``), then the plain added
  tokens ``hello`` and ``merge`` and a special ``<|im_end|>`` at another id than ``chat``'s
  (57 tokens, 57 rows);
- ``slim``: a retrained vocabulary without ``;`` (52 tokens, 52 rows, so every token after it
  sits one id lower), a token the base and the others have;
- ``same``, ``same2``: fine-tunes that kept the base's tokenizer; ``bare``: one without any
  tokenizer file.

Every fine-tune is its resized base plus seeded noise on every parameter, so every row of every
model differs. The outputs are compared with mergekit 0.1.5 row by row after aligning the
vocabulary-indexed rows by token string (mergekit's union ids follow a hash order, mergetui's the
recipe's model order).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_LLAMA
from mergekit_ref import (
    MergekitReference,
    assert_same_config,
    assert_same_tensors,
    read_tensors,
    save_random_f32,
)

from mergetui.demo import VOCAB
from mergetui.engine.executor import run_merge
from mergetui.engine.plan import MergePlan, build_plan
from mergetui.engine.vocabulary import check_template_tokens
from mergetui.errors import CompatibilityError, RecipeError
from mergetui.recipe import load_recipe, parse_recipe
from mergetui.recipe.toml_io import recipe_to_data

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
#: The chat fine-tune's own template (not mergetui's built-in ChatML text, so a test can tell
#: which one an output got).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Tokens each fine-tune added to the base's vocabulary.
NEW_TOKENS = {
    "chat": ("<|im_start|>", "<|im_end|>"),
    "pad": ("<pad2>",),
    "domain": ("ing", "hello", "merge", "<|im_end|>"),
}


# -- the zoo ---------------------------------------------------------------------------------------


def save_tokenizer(directory: Path, tokens: Sequence[str] | dict[str, int] = tuple(VOCAB)) -> None:
    """The demo's character tokenizer (``mergetui.demo.save_char_tokenizer``) over ``tokens``
    (regular tokens, a retrained vocabulary; a dict gives each one's id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tokens if isinstance(tokens, dict) else {t: i for i, t in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    ).save_pretrained(directory)


def save_resized_finetune(
    base: Path,
    directory: Path,
    seed: int,
    edit: Callable[[Any], None] = lambda tokenizer: None,
    *,
    tokenizer_from: Path | None = None,
    pad_to_multiple_of: int | None = None,
    tie_word_embeddings: bool | None = None,
) -> Path:
    """A fine-tune as one is made: the tokenizer (the base's, or ``tokenizer_from``'s) edited by
    ``edit``, the base model resized to it, then a seeded dense update of every parameter; both
    saved with ``save_pretrained`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or base)
    edit(tokenizer)
    options = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **options)
    torch.manual_seed(seed)  # resize_token_embeddings draws the new rows
    if tie_word_embeddings is False:
        # untied from a tied base: the head starts as the embedding it was tied to
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    if len(tokenizer) != model.config.vocab_size or pad_to_multiple_of:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def add_chat_tokens(tokenizer: Any) -> None:
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE


def add_pad_token(tokenizer: Any) -> None:
    tokenizer.add_special_tokens({"pad_token": "<pad2>"})


def add_domain_tokens(tokenizer: Any) -> None:
    tokenizer.add_tokens(["hello", "merge"])
    tokenizer.add_tokens(["<|im_end|>"], special_tokens=True)


def save_slim_finetune(base: Path, directory: Path, seed: int, drop: str) -> Path:
    """A fine-tune whose vocabulary was retrained without ``drop``: its tokenizer lacks it, its
    embedding and head lack its row (the later tokens one id lower), then seeded noise."""
    import torch
    from transformers import AutoModelForCausalLM

    save_tokenizer(directory, [token for token in VOCAB if token != drop])
    keep = [index for index, token in enumerate(VOCAB) if token != drop]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    stored = read_tensors(base)
    model.resize_token_embeddings(len(keep))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(stored[EMBED][keep])
        model.lm_head.weight.copy_(stored[HEAD][keep])
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(directory)
    return directory


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(VOCAB), **overrides})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab-zoo")
    models = {"base": save_random_f32(root / "base", llama_config(), seed=30)}
    save_tokenizer(models["base"])
    base = models["base"]
    models["chat"] = save_resized_finetune(base, root / "chat", 31, add_chat_tokens)
    models["pad"] = save_resized_finetune(
        base, root / "pad", 32, add_pad_token, pad_to_multiple_of=8
    )
    save_tokenizer(root / "domain-tokenizer", [*VOCAB, "ing"])
    models["domain"] = save_resized_finetune(
        base, root / "domain", 33, add_domain_tokens, tokenizer_from=root / "domain-tokenizer"
    )
    models["slim"] = save_slim_finetune(base, root / "slim", 37, drop=";")
    models["same"] = save_resized_finetune(base, root / "same", 34)
    models["same2"] = save_resized_finetune(base, root / "same2", 35)
    models["bare"] = save_resized_finetune(base, root / "bare", 36)
    for file in list(models["bare"].iterdir()):
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            file.unlink()
    return models


def test_zoo_is_what_the_tests_assume(zoo: dict[str, Path]) -> None:
    """The fine-tunes really have the vocabularies and row counts the other tests rely on."""
    from transformers import AutoTokenizer

    expected = {
        "base": (53, 53),
        "chat": (55, 55),
        "pad": (54, 56),
        "domain": (57, 57),
        "slim": (52, 52),
    }
    for name, (tokens, rows) in expected.items():
        tokenizer = AutoTokenizer.from_pretrained(zoo[name])
        tensors = read_tensors(zoo[name])
        assert len(tokenizer) == tokens, name
        assert config_of(zoo[name])["vocab_size"] == rows, name
        assert tensors[EMBED].shape[0] == tensors[HEAD].shape[0] == rows, name
        for token in NEW_TOKENS.get(name, ()):
            assert token in tokenizer.get_vocab(), (name, token)
    assert AutoTokenizer.from_pretrained(zoo["chat"]).chat_template == CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(zoo["pad"]).pad_token == "<pad2>"
    domain = AutoTokenizer.from_pretrained(zoo["domain"]).get_vocab()
    chat = AutoTokenizer.from_pretrained(zoo["chat"]).get_vocab()
    assert domain["ing"] == 53 and domain["<|im_end|>"] != chat["<|im_end|>"]
    slim = AutoTokenizer.from_pretrained(zoo["slim"]).get_vocab()
    assert ";" not in slim and slim["\n"] == 51 and chat["\n"] == 52
    assert not any(p.name.startswith("tokenizer") for p in zoo["bare"].iterdir())


# -- helpers ---------------------------------------------------------------------------------------

#: Per method: the models (zoo names, in recipe order: ``models[0]`` chat, ``models[1]`` pad,
#: ``models[2]`` domain, ``models[3]`` slim) and each one's parameters. mergekit's ``linear``
#: takes ``base_model`` as one more input (it needs a weight), so mergetui's recipe lists the base
#: under [[models]] as well, as ``mergetui import`` translates it.
METHODS: dict[str, tuple[tuple[str, dict[str, float]], ...]] = {
    "ties": (
        ("chat", {"weight": 1.0, "density": 0.5}),
        ("pad", {"weight": 0.7, "density": 0.5}),
        ("domain", {"weight": 0.4, "density": 0.5}),
        ("slim", {"weight": 0.5, "density": 0.5}),
    ),
    "linear": (
        ("chat", {"weight": 0.6}),
        ("pad", {"weight": 0.3}),
        ("domain", {"weight": 0.2}),
        ("slim", {"weight": 0.4}),
        ("base", {"weight": 0.1}),
    ),
}


def recipe_text(
    zoo: dict[str, Path],
    output: Path,
    *,
    method: str = "ties",
    merge: str = "",
    tokens: str = "",
    models: Sequence[tuple[str, dict[str, float]]] | None = None,
    base: str | None = "base",
    version: int = 2,
) -> str:
    """A recipe merging ``models`` (default: :data:`METHODS`' for ``method``) onto ``base``,
    with extra ``[merge]`` lines and a ``[merge.tokens]`` body."""
    head = f'version = {version}\n[merge]\nmethod = "{method}"\ndevice = "cpu"\n'
    if base:
        head += f'base = "{zoo[base]}"\n'
    head += textwrap.dedent(merge).strip() + "\n"
    if tokens:
        head += "[merge.tokens]\n" + textwrap.dedent(tokens).strip() + "\n"
    entries = "".join(
        f'[[models]]\nmodel = "{zoo[name]}"\n'
        + "".join(f"{key} = {value}\n" for key, value in params.items())
        for name, params in (METHODS[method] if models is None else models)
    )
    return head + entries + f'[output]\npath = "{output}"\n'


def plan_of(text: str) -> MergePlan:
    return build_plan(parse_recipe(text))


def merge(text: str) -> Path:
    """Parse, plan (no errors allowed) and run a recipe; the output folder."""
    plan = plan_of(text)
    assert not plan.errors, [str(p) for p in plan.errors]
    return run_merge(plan).output_dir


def config_of(directory: Path) -> dict[str, Any]:
    return dict(json.loads((directory / "config.json").read_text()))


def rows_of(directory: Path, token: str) -> tuple[Any, Any]:
    """The embedding and head rows of ``token`` in the model in ``directory`` (by its own ids)."""
    from transformers import AutoTokenizer

    index = AutoTokenizer.from_pretrained(directory).get_vocab()[token]
    tensors = read_tensors(directory)
    return tensors[EMBED][index], tensors.get(HEAD, tensors[EMBED])[index]


def added_flags(tokenizer: Any) -> dict[str, tuple[bool, ...]]:
    return {
        info.content: (info.special, info.normalized, info.lstrip, info.rstrip, info.single_word)
        for info in tokenizer.added_tokens_decoder.values()
    }


def assert_same_tokenizer(ours: Path, theirs: Path) -> None:
    """The same tokens (ids may differ), the same added-token flags, special tokens and chat
    template."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert sorted(a.get_vocab()) == sorted(b.get_vocab())
    assert added_flags(a) == added_flags(b)
    assert a.special_tokens_map == b.special_tokens_map
    assert a.chat_template == b.chat_template


def aligned_to(ours: Path, theirs: Path) -> dict[str, Any]:
    """``theirs``' tensors with the rows of every vocabulary-indexed tensor put in the order of
    ``ours``' token ids (padding rows, past the last token, stay where they are)."""
    from transformers import AutoTokenizer

    our_ids = AutoTokenizer.from_pretrained(ours).get_vocab()
    their_ids = AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert our_ids.keys() == their_ids.keys()
    rows = config_of(theirs)["vocab_size"]
    order = list(range(rows))
    for token, index in our_ids.items():
        order[index] = their_ids[token]
    tensors = read_tensors(theirs)
    return {
        name: tensor[order] if is_vocabulary_indexed(name, tensor, rows) else tensor
        for name, tensor in tensors.items()
    }


def is_vocabulary_indexed(name: str, tensor: Any, rows: int) -> bool:
    return ".layers." not in name and tensor.dim() == 2 and tensor.shape[0] == rows


#: ``assert_same_tensors`` with this tolerance demands equal bits (its limit is
#: ``rel * max(1, max|theirs|)``, and no float32 difference is that small; 0 would divide by it).
EXACT = 1e-30


def split_padding(tensors: dict[str, Any], tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors with their token rows only, and the padding rows (past the last token) of the
    vocabulary-indexed ones, by name."""
    rows = next(t.shape[0] for n, t in tensors.items() if n == EMBED)
    kept, padding = {}, {}
    for name, tensor in tensors.items():
        if is_vocabulary_indexed(name, tensor, rows) and rows > tokens:
            kept[name], padding[name] = tensor[:tokens], tensor[tokens:]
        else:
            kept[name] = tensor
    return kept, padding


def assert_same_as_mergekit(ours: Path, theirs: Path) -> None:
    """Same tokenizer, same config, every tensor bit for bit once rows are aligned by token.

    Padding rows (``pad_to_multiple_of``) are each model's mean token row, and a mean's float32
    rounding depends on the order the rows are summed in, which is the token id order: mergekit's
    union ids follow a hash order of its model paths (they change with the test's temporary
    folder), mergetui's the recipe's model order. So padding rows are equal to float32 rounding
    (checked: the same sums in mergekit's order give mergekit's bits), every other row exactly."""
    from transformers import AutoTokenizer

    assert_same_tokenizer(ours, theirs)
    assert_same_config(ours, theirs)
    tokens = len(AutoTokenizer.from_pretrained(ours))
    mine, their_rows = read_tensors(ours), aligned_to(ours, theirs)
    mine, my_padding = split_padding(mine, tokens)
    their_rows, their_padding = split_padding(their_rows, tokens)
    assert_same_tensors(mine, their_rows, ours, theirs, rel=EXACT)
    assert_same_tensors(my_padding, their_padding, ours, theirs, rel=1e-6)


def mergekit_yaml(zoo: dict[str, Path], method: str, tokenizer: str) -> str:
    """The mergekit config for :data:`METHODS`' ``method`` onto ``base``, with ``tokenizer``
    (YAML lines, ``{name}`` placeholders for the zoo's paths)."""
    lines = ["models:"]
    for name, params in METHODS[method]:
        values = ", ".join(f"{key}: {value}" for key, value in params.items())
        lines += [f"  - model: {zoo[name]}", f"    parameters: {{{values}}}"]
    lines += [f"merge_method: {method}", f"base_model: {zoo['base']}", "dtype: float32"]
    return "\n".join(lines) + "\n" + textwrap.dedent(tokenizer).strip().format(**zoo) + "\n"


# -- 1. the merged model is a real model -----------------------------------------------------------


@pytest.fixture(scope="module")
def union_output(zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TIES of chat, pad, domain and slim onto the base, union vocabulary, the chat model's
    template."""
    folder = tmp_path_factory.mktemp("union")
    return merge(
        recipe_text(zoo, folder / "out", merge='tokenizer = "union"\nchat_template = "models[0]"')
    )


def test_union_output_has_every_token_and_loads(zoo: dict[str, Path], union_output: Path) -> None:
    """Every token of every model is in the output tokenizer, which transformers loads with the
    model; ``len(tokenizer) <= vocab_size ==`` the rows of the embedding and of the head; each
    added token encodes to its one id, with its flags (special or not) kept; the chat template is
    the chat model's and tokenizes its markers to single tokens; the model generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(union_output)
    model = AutoModelForCausalLM.from_pretrained(union_output, dtype=torch.float32)
    vocab = tokenizer.get_vocab()
    for name in ("base", "chat", "pad", "domain", "slim"):
        missing = set(AutoTokenizer.from_pretrained(zoo[name]).get_vocab()) - set(vocab)
        assert not missing, f"{name}'s tokens {missing} are not in the union"
    assert len(vocab) == 53 + 6  # the base's, then <|im_start|> <|im_end|> <pad2> ing hello merge
    rows = config_of(union_output)["vocab_size"]
    tensors = read_tensors(union_output)
    assert len(tokenizer) <= rows == tensors[EMBED].shape[0] == tensors[HEAD].shape[0]
    assert model.model.embed_tokens.weight.shape[0] == rows

    for token in {t for tokens in NEW_TOKENS.values() for t in tokens}:
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]], token
    flags = added_flags(tokenizer)
    for token in ("<|im_start|>", "<|im_end|>", "<pad2>"):
        assert flags[token][0], f"{token} lost its special flag"
    for token in ("hello", "merge", "ing"):
        assert not flags[token][0], f"{token} became special"
    assert tokenizer.pad_token == "<pad>"  # the base's tokenizer files are the starting point

    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    ids = list(prompt["input_ids"])
    assert ids[0] == vocab["<|im_start|>"] and vocab["<|im_end|>"] in ids
    assert vocab["hello"] in ids
    generated = model.generate(
        torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert generated.shape == (1, len(ids) + 4)


def test_union_rows_of_a_token_one_model_has_are_that_models(
    zoo: dict[str, Path], union_output: Path
) -> None:
    """``missing_tokens = "borrow"`` (mergekit's rule): a token only one model has is given that
    model's row in every other model (the base included), so under TIES every task vector is zero
    there and the output row is exactly that model's, in the embedding and in the head."""
    import torch

    for name, token in [
        ("chat", "<|im_start|>"),
        ("pad", "<pad2>"),
        ("domain", "hello"),
        ("domain", "merge"),
        ("domain", "ing"),
    ]:
        for ours, theirs, which in zip(
            rows_of(union_output, token),
            rows_of(zoo[name], token),
            ("embedding", "head"),
            strict=True,
        ):
            assert torch.equal(ours, theirs), f"{which} row of {token!r} is not {name}'s"


def test_base_vocabulary_drops_added_tokens_and_loads(zoo: dict[str, Path], tmp_path: Path) -> None:
    """``tokenizer = "base"``: the output has the base's tokenizer files and 53 rows; the tokens
    the fine-tunes added are not single tokens; the model loads and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(recipe_text(zoo, tmp_path / "out", merge='tokenizer = "base"'))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (zoo["base"] / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tensors = read_tensors(out)
    assert len(tokenizer) == config_of(out)["vocab_size"] == tensors[EMBED].shape[0] == 53
    assert tensors[HEAD].shape[0] == 53
    assert len(tokenizer.encode("<|im_start|>", add_special_tokens=False)) > 1
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokenizer.encode("hello", return_tensors="pt")
    generated = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def vocabulary_of(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(directory).get_vocab())


@pytest.mark.parametrize("rule", ["borrow", "base_mean", "zero"])
def test_missing_token_rules_give_the_rows_they_say(
    rule: str, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """A linear merge (the base given but not an input, so it is read for the alignment only)
    under each ``missing_tokens`` rule: the output row of a token is the weighted mean of each
    model's own row, or the rule's row where the model lacks the token:

    - ``borrow``: the one holder's row (``<|im_start|>``: chat's); the base's row when the base
      has it (``;``, which slim lacks); else the mean of the holders' rows (``<|im_end|>``: chat's
      and domain's), as mergekit does;
    - ``base_mean``: the mean of all the base's rows;
    - ``zero``: zeros.
    """
    import torch

    weights = {"chat": 0.6, "pad": 0.3, "domain": 0.2, "slim": 0.4}
    out = merge(
        recipe_text(
            zoo,
            tmp_path / "out",
            method="linear",
            merge=f'tokenizer = "union"\nmissing_tokens = "{rule}"',
            models=[(name, {"weight": w}) for name, w in weights.items()],
        )
    )
    merged, base = read_tensors(out), read_tensors(zoo["base"])
    inputs = {name: read_tensors(zoo[name]) for name in weights}
    vocabularies = {name: vocabulary_of(zoo[name]) for name in [*weights, "base"]}
    out_ids = vocabulary_of(out)
    for tensor_name in (EMBED, HEAD):
        for token in ("<|im_start|>", "<|im_end|>", "<pad2>", "hello", ";", "a"):
            own = {
                name: inputs[name][tensor_name][vocabularies[name][token]]
                for name in weights
                if token in vocabularies[name]
            }
            if rule == "zero":
                default = torch.zeros(32)
            elif rule == "base_mean":
                default = base[tensor_name].mean(dim=0)
            elif len(own) == 1:
                default = next(iter(own.values()))
            elif token in vocabularies["base"]:
                default = base[tensor_name][vocabularies["base"][token]]
            else:
                default = sum(own.values()) / len(own)
            expected = sum(w * own.get(name, default) for name, w in weights.items()) / sum(
                weights.values()
            )
            got = merged[tensor_name][out_ids[token]]
            assert torch.allclose(got, expected, rtol=0, atol=1e-6), (rule, tensor_name, token)


# -- 2. equal to mergekit --------------------------------------------------------------------------

#: name → (mergekit's tokenizer keys, mergetui's [merge] lines, mergetui's [merge.tokens] body).
#: ``{chat}``... in the YAML stand for the zoo's paths; in the recipes ``models[0]`` is chat,
#: ``models[1]`` pad, ``models[2]`` domain and ``models[3]`` slim, for both methods.
MERGEKIT_CASES: dict[str, tuple[str, str, str]] = {
    "union": ("tokenizer_source: union", 'tokenizer = "union"', ""),
    "base": ("tokenizer_source: base", 'tokenizer = "base"', ""),
    "union-padded-to-8": (
        """
        tokenizer:
          source: union
          pad_to_multiple_of: 8
        """,
        'tokenizer = "union"\npad_to_multiple_of = 8',
        "",
    ),
    "tokens-from-a-model": (
        # <|im_end|>: chat's row for the models that lack it (base, pad); <eot> (no model has it):
        # chat's <|im_end|> row; <sys> (no model has it): domain's row 53 (its `ing`)
        """
        tokenizer:
          source: union
          tokens:
            "<|im_end|>":
              source: {chat}
            "<eot>":
              source:
                kind: model_token
                model: {chat}
                token: "<|im_end|>"
            "<sys>":
              source:
                kind: model_token
                model: {domain}
                token_id: 53
        """,
        'tokenizer = "union"',
        """
        "<|im_end|>" = "models[0]"
        "<eot>" = { source = "models[0]", token = "<|im_end|>" }
        "<sys>" = { source = "models[2]", token_id = 53 }
        """,
    ),
    "tokens-zero": (
        """
        tokenizer:
          source: union
          tokens:
            "<pad2>":
              source:
                kind: zero
            "<none>":
              source:
                kind: zero
        """,
        'tokenizer = "union"',
        """
        "<pad2>" = "zero"
        "<none>" = "zero"
        """,
    ),
    "tokens-forced": (
        # every model takes the base's row of `a`, and domain's row of <|im_end|> (chat's own
        # is replaced too)
        """
        tokenizer:
          source: union
          tokens:
            a:
              source: {base}
              force: true
            "<|im_end|>":
              source: {domain}
              force: true
        """,
        'tokenizer = "union"',
        """
        "a" = { source = "base", force = true }
        "<|im_end|>" = { source = "models[2]", force = true }
        """,
    ),
    "a-model's-vocabulary": (
        "tokenizer_source: {chat}",
        'tokenizer = "models[0]"',
        "",
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_equal_to_mergekit(
    case: str,
    method: str,
    zoo: dict[str, Path],
    mergekit: MergekitReference,
    tmp_path: Path,
) -> None:
    """The same output as mergekit 0.1.5 for its tokenizer settings: the same tokens (with their
    flags and the same chat template), config.json (vocab_size included) and every tensor bit for
    bit, rows aligned by token. TIES takes the base as its base; linear takes it as one more
    input (mergekit's ``linear`` with ``base_model``)."""
    tokenizer_yaml, merge_lines, tokens = MERGEKIT_CASES[case]
    theirs = mergekit.merge(mergekit_yaml(zoo, method, tokenizer_yaml), tmp_path / "mergekit")
    ours = merge(
        recipe_text(zoo, tmp_path / "mergetui", method=method, merge=merge_lines, tokens=tokens)
    )
    assert_same_as_mergekit(ours, theirs)


def test_output_recipe_replays_the_vocabulary_settings(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    """The recipe saved next to the weights keeps every vocabulary key ([merge.tokens] with its
    tables, missing_tokens, pad_to_multiple_of), so it replays the same merge."""
    _, _, tokens = MERGEKIT_CASES["tokens-from-a-model"]
    text = recipe_text(
        zoo,
        tmp_path / "out",
        merge='tokenizer = "union"\nmissing_tokens = "base_mean"\npad_to_multiple_of = 16',
        tokens=textwrap.dedent(tokens) + '\n"<pad2>" = { source = "zero", force = true }',
    )
    out = merge(text)
    assert config_of(out)["vocab_size"] == 64  # 53 + 6 + <eot> <sys> = 61, rounded up to 16
    first, saved = parse_recipe(text), load_recipe(out / "mergetui.toml")
    assert saved.vocabulary == first.vocabulary
    assert recipe_to_data(saved)["merge"] == recipe_to_data(first)["merge"]


@pytest.mark.parametrize("method", list(METHODS))
def test_padded_models_vocabulary_keeps_its_padding(
    method: str, zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """``tokenizer = "models[1]"``, the pad model: 54 tokens in 56 rows (it was resized with
    ``pad_to_multiple_of=8``).

    mergetui deliberately differs from mergekit's ``tokenizer_source: <that model>`` here:
    mergekit sizes the output to the tokenizer (54 rows, ``vocab_size`` 54), dropping the padding
    the model was given (for the hardware's sake: a multiple of 8 or 64 is faster); mergetui keeps
    the source's 56 rows, each padding row being each model's mean token row before the merge, as
    mergekit makes padding rows. So the output equals mergekit's with ``pad_to_multiple_of: 8``
    everywhere and, for linear (which merges each row on its own), mergekit's plain one in its
    first 54 rows. (TIES ranks a task vector's entries over the whole tensor, so two more rows
    change which entries of the others it keeps: no row-by-row comparison there.)"""
    ours = merge(
        recipe_text(zoo, tmp_path / "mergetui", method=method, merge='tokenizer = "models[1]"')
    )
    assert config_of(ours)["vocab_size"] == 56
    padded = mergekit.merge(
        mergekit_yaml(zoo, method, "tokenizer:\n  source: {pad}\n  pad_to_multiple_of: 8"),
        tmp_path / "mergekit-padded",
    )
    assert_same_as_mergekit(ours, padded)

    plain = mergekit.merge(
        mergekit_yaml(zoo, method, "tokenizer_source: {pad}"), tmp_path / "mergekit"
    )
    assert config_of(plain)["vocab_size"] == 54
    assert read_tensors(plain)[EMBED].shape[0] == 54
    assert_same_tokenizer(ours, plain)
    assert_same_config(ours, plain, ignore=("transformers_version", "vocab_size"))
    if method == "linear":
        mine, _ = split_padding(read_tensors(ours), 54)
        assert_same_tensors(mine, aligned_to(ours, plain), ours, plain, rel=EXACT)


# -- mergekit's YAML, imported ---------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("case", list(MERGEKIT_CASES))
def test_imported_mergekit_config_gives_the_hand_written_recipes_output(
    case: str, method: str, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """``mergetui run config.yaml`` on the mergekit configs above (``tokenizer_source``, the
    ``tokenizer`` block with ``tokens`` and ``pad_to_multiple_of``) gives, byte for byte, the
    weights, config and tokenizer the hand-written recipes give (which equal mergekit's)."""
    from mergetui.recipe.mergekit_yaml import recipe_from_mergekit

    tokenizer_yaml, merge_lines, tokens = MERGEKIT_CASES[case]
    text = mergekit_yaml(zoo, method, tokenizer_yaml)
    imported = recipe_from_mergekit(text, source_file="config.yaml", base_dir=tmp_path)
    imported = dataclasses.replace(imported, output_path=str(tmp_path / "imported"), device="cpu")
    plan = build_plan(imported)
    assert not plan.errors, [str(p) for p in plan.errors]
    from_yaml = run_merge(plan).output_dir
    by_hand = merge(
        recipe_text(zoo, tmp_path / "by-hand", method=method, merge=merge_lines, tokens=tokens)
    )
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (from_yaml / name).read_bytes() == (by_hand / name).read_bytes(), name


@pytest.mark.parametrize("case", [case for case in MERGEKIT_CASES if case != "base"])
def test_exported_recipe_gives_the_same_output_in_mergekit(
    case: str, zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """``mergetui export`` of the hand-written recipes (``[merge.tokens]`` as mergekit's
    ``tokens``, ``models[i]`` as paths) makes mergekit give mergetui's output.

    Not ``tokenizer = "base"`` alone: the export leaves it implicit, as documented in
    ``mergekit_yaml._mergekit_tokenizer`` (mergekit then merges rows by index, which is
    mergetui's result when the models share the base's vocabulary; these do not, so mergekit
    stops at the first embedding of another size)."""
    from mergetui.recipe.mergekit_yaml import recipe_to_mergekit

    _, merge_lines, tokens = MERGEKIT_CASES[case]
    text = recipe_text(zoo, tmp_path / "mergetui", merge=merge_lines, tokens=tokens)
    ours = merge(text)
    exported = recipe_to_mergekit(parse_recipe(text), target_dir=tmp_path)
    assert_same_as_mergekit(ours, mergekit.merge(exported, tmp_path / "mergekit"))


@pytest.mark.parametrize("template", ["auto", "chatml", "llama3"])
def test_chat_template_renders_as_mergekits(
    template: str, zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """``chat_template`` with a union vocabulary: ``auto`` (the plurality of the models'
    templates: the chat model's, the only one) and the built-in ``chatml`` and ``llama3``. The
    built-in texts are mergetui's own, not mergekit's files (which differ in line breaks), so the
    conversations they render are compared; the weights are mergekit's as in every union merge.

    ``llama3`` deliberately differs: mergekit's ``llama3.jinja`` writes a line break after every
    turn (``{{ content }}`` then a new line inside the loop, which transformers' ``trim_blocks``
    does not remove), Meta's Llama 3 format has none (``<|eot_id|><|start_header_id|>``), and
    mergetui's follows Meta's: the same text but for those line breaks."""
    from transformers import AutoTokenizer

    theirs = mergekit.merge(
        mergekit_yaml(zoo, "ties", f"tokenizer_source: union\nchat_template: {template}"),
        tmp_path / "mergekit",
    )
    ours = merge(
        recipe_text(
            zoo,
            tmp_path / "mergetui",
            merge=f'tokenizer = "union"\nchat_template = "{template}"',
        )
    )
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": " merge "},
        {"role": "user", "content": "ing"},
    ]
    rendered: list[str] = []
    for directory in (ours, theirs):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert tokenizer.chat_template
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str)
        rendered.append(text)
    if template == "llama3":
        assert "<|eot_id|>\n<|start_header_id|>" in rendered[1]
        rendered[1] = rendered[1].replace("<|eot_id|>\n", "<|eot_id|>")
        turn = "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
        assert turn in rendered[0]
    assert rendered[0] == rendered[1]
    if template == "auto":
        assert AutoTokenizer.from_pretrained(ours).chat_template == CHAT_TEMPLATE
    tokens = len(AutoTokenizer.from_pretrained(ours))
    mine, _ = split_padding(read_tensors(ours), tokens)
    assert_same_tensors(mine, aligned_to(ours, theirs), ours, theirs, rel=EXACT)


def slices_merge(
    zoo: dict[str, Path], mergekit: MergekitReference, folder: Path, first: str, last: str
) -> tuple[Path, Path]:
    """A linear merge of two slices (layer 0: chat 0.7 and ``first`` 0.3; layer 1: ``last`` 0.5
    and chat 0.5) with the base given and a union vocabulary, by mergekit and by mergetui: the
    embedding comes from the first slice's sources, the head from the last one's."""
    sources = [
        [(zoo["chat"], 0.7, 0), (zoo[first], 0.3, 0)],
        [(zoo[last], 0.5, 1), (zoo["chat"], 0.5, 1)],
    ]
    yaml = "slices:\n" + "".join(
        "  - sources:\n"
        + "".join(
            f"      - model: {model}\n        layer_range: [{layer}, {layer + 1}]\n"
            f"        parameters: {{weight: {weight}}}\n"
            for model, weight, layer in piece
        )
        for piece in sources
    )
    yaml += f"merge_method: linear\nbase_model: {zoo['base']}\ntokenizer_source: union\n"
    toml = (
        f'version = 2\n[merge]\nmethod = "linear"\ndevice = "cpu"\nbase = "{zoo["base"]}"\n'
        'tokenizer = "union"\n'
        + "".join(
            "[[slices]]\n"
            + "".join(
                f'[[slices.sources]]\nmodel = "{model}"\nlayer_range = [{layer}, {layer + 1}]\n'
                f"weight = {weight}\n"
                for model, weight, layer in piece
            )
            for piece in sources
        )
        + f'[output]\npath = "{folder / "mergetui"}"\n'
    )
    theirs = mergekit.merge(yaml + "dtype: float32\n", folder / "mergekit")
    return merge(toml), theirs


def test_slices_align_vocabularies_as_mergekit(
    zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """An output made of slices with a union vocabulary: each vocabulary-indexed tensor aligned
    over its own slice's sources (the embedding over chat and domain, the head over pad and
    chat), as mergekit does."""
    assert_same_as_mergekit(*slices_merge(zoo, mergekit, tmp_path, first="domain", last="pad"))


def test_slices_borrow_from_the_one_source_that_has_the_token(
    zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """As above with slim, which lacks ``;``, among the sources of both slices: of each slice's
    sources only chat has ``;``, so slim borrows chat's row (mergekit's rule: held by exactly one
    of the merged models). The base is no source of the slices; mergekit never looks at it for
    the default row, and neither should the alignment."""
    assert_same_as_mergekit(*slices_merge(zoo, mergekit, tmp_path, first="slim", last="slim"))


# -- 3. tied embeddings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``base``: a Llama with ``tie_word_embeddings=True`` (its checkpoint has no lm_head.weight);
    ``tied``: a tied fine-tune of it; ``untied``: a fine-tune that untied its head (which starts as
    the embedding) and added ``<|im_end|>`` (54 rows)."""
    root = tmp_path_factory.mktemp("tied-zoo")
    base = save_random_f32(root / "base", llama_config(tie_word_embeddings=True), seed=40)
    save_tokenizer(base)
    models = {"base": base}
    models["tied"] = save_resized_finetune(base, root / "tied", 41)
    models["untied"] = save_resized_finetune(
        base,
        root / "untied",
        42,
        lambda tokenizer: tokenizer.add_tokens(["<|im_end|>"], special_tokens=True),
        tie_word_embeddings=False,
    )
    return models


def test_tied_zoo_is_what_the_tests_assume(tied_zoo: dict[str, Path]) -> None:
    for name in ("base", "tied"):
        assert HEAD not in read_tensors(tied_zoo[name]), name
        assert config_of(tied_zoo[name])["tie_word_embeddings"] is True
    untied = read_tensors(tied_zoo["untied"])
    assert config_of(tied_zoo["untied"])["tie_word_embeddings"] is False
    assert untied[HEAD].shape[0] == untied[EMBED].shape[0] == 54
    assert not untied[HEAD].equal(untied[EMBED])


def tied_recipe(zoo: dict[str, Path], output: Path, merge: str = "") -> str:
    """task_arithmetic of the untied and the tied fine-tunes onto the tied base, union."""
    return recipe_text(
        zoo,
        output,
        method="task_arithmetic",
        merge='tokenizer = "union"\n' + merge,
        models=[("untied", {"weight": 0.7}), ("tied", {"weight": 0.5})],
    )


TIED_YAML = """
models:
  - model: {untied}
    parameters: {{weight: 0.7}}
  - model: {tied}
    parameters: {{weight: 0.5}}
merge_method: task_arithmetic
base_model: {base}
tokenizer_source: union
dtype: float32
"""


def test_tied_base_gives_a_tied_output(
    tied_zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """By default the output ties as the base's config.json says: one tensor written (no
    lm_head.weight), config still tied, and transformers loads the head as the embedding. The plan
    warns that the untied model's head is not used, naming it.

    mergekit writes an lm_head.weight here (some input has one) under a config that still says
    tied, so transformers ignores it on load; mergetui does not write a tensor nobody reads. Every
    other tensor is mergekit's, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    plan = plan_of(tied_recipe(tied_zoo, tmp_path / "out"))
    assert not plan.errors
    assert plan.vocabulary is not None and plan.vocabulary.out_tied
    warning = next(p.message for p in plan.warnings if "tied embeddings" in p.message)
    assert "models[0]" in warning and HEAD in warning and "models[1]" not in warning
    out = run_merge(plan).output_dir

    tensors = read_tensors(out)
    assert HEAD not in tensors and tensors[EMBED].shape[0] == 54
    assert config_of(out)["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, tensors[EMBED])
    generated = model.generate(
        torch.tensor([[1, 5, 6]]), max_new_tokens=3, min_new_tokens=3, do_sample=False
    )
    assert generated.shape == (1, 6)

    theirs = mergekit.merge(TIED_YAML.format(**tied_zoo), tmp_path / "mergekit")
    their_tensors = aligned_to(out, theirs)
    assert HEAD in their_tensors
    del their_tensors[HEAD]
    assert_same_tensors(tensors, their_tensors, out, theirs, rel=EXACT)
    assert_same_config(out, theirs)


def test_untied_output_merges_the_heads_tied_inputs_giving_their_embedding(
    tied_zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """``tie_word_embeddings = false``: the output gets its own lm_head.weight, merged from the
    untied model's head and the embeddings of the tied base and fine-tune (their head), and
    config.json says untied. That is exactly mergekit's lm_head (which keeps the base's
    ``tie_word_embeddings: true`` in config.json, the one difference); transformers loads the two
    tensors apart."""
    import torch
    from transformers import AutoModelForCausalLM

    plan = plan_of(tied_recipe(tied_zoo, tmp_path / "out", "tie_word_embeddings = false"))
    assert not plan.errors
    assert plan.vocabulary is not None and not plan.vocabulary.out_tied
    warning = next(p.message for p in plan.warnings if "tied embeddings" in p.message)
    assert "models[1]" in warning and "base" in warning
    out = run_merge(plan).output_dir
    tensors = read_tensors(out)
    assert tensors[HEAD].shape == tensors[EMBED].shape == (54, 32)
    assert config_of(out)["tie_word_embeddings"] is False

    theirs = mergekit.merge(TIED_YAML.format(**tied_zoo), tmp_path / "mergekit")
    assert_same_tensors(tensors, aligned_to(out, theirs), out, theirs, rel=EXACT)
    assert_same_config(out, theirs, ignore=("transformers_version", "tie_word_embeddings"))
    assert config_of(theirs)["tie_word_embeddings"] is True

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, tensors[HEAD])


def test_untied_reference_takes_a_tied_models_embedding_as_its_head(
    tied_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """No base, the untied model first: the output is untied as its config says, and the tied
    model's head in the merge is its embedding (a linear merge, checked by hand); the plan says
    so, naming the tied model."""
    import torch

    weights = {"untied": 0.75, "tied": 0.25}
    text = recipe_text(
        tied_zoo,
        tmp_path / "out",
        method="linear",
        base=None,
        merge='tokenizer = "union"',
        models=[(name, {"weight": w}) for name, w in weights.items()],
    )
    plan = plan_of(text)
    assert not plan.errors
    warning = next(p.message for p in plan.warnings if "tied embeddings" in p.message)
    assert "models[1]" in warning
    out = run_merge(plan).output_dir
    assert config_of(out)["tie_word_embeddings"] is False
    got, untied, tied = (
        read_tensors(out),
        read_tensors(tied_zoo["untied"]),
        read_tensors(tied_zoo["tied"]),
    )
    # <|im_end|> (row 53) is the untied model's alone: the tied one borrows it (its head too)
    expected_head = torch.cat(
        [
            0.75 * untied[HEAD][:53] + 0.25 * tied[EMBED],
            0.75 * untied[HEAD][53:] + 0.25 * untied[HEAD][53:],
        ]
    )
    assert torch.allclose(got[HEAD], expected_head, rtol=0, atol=1e-6)
    assert not torch.allclose(got[HEAD], got[EMBED])


def test_tie_word_embeddings_true_ties_an_untied_output(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    """``tie_word_embeddings = true`` on untied models: one tensor written, config.json says tied,
    transformers loads the head as the merged embedding; the plan says the heads are not used."""
    import torch
    from transformers import AutoModelForCausalLM

    plan = plan_of(
        recipe_text(
            zoo,
            tmp_path / "out",
            merge='tokenizer = "union"\ntie_word_embeddings = true',
            models=METHODS["ties"][:2],
        )
    )
    assert not plan.errors
    warning = next(p.message for p in plan.warnings if "tied embeddings" in p.message)
    assert "base, models[0], models[1]" in warning and "merge.tie_word_embeddings" in warning
    out = run_merge(plan).output_dir
    tensors = read_tensors(out)
    assert HEAD not in tensors
    assert config_of(out)["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, tensors[EMBED])


def test_untying_models_that_are_all_tied_is_an_error(
    tied_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """``tie_word_embeddings = false`` when no model has a head of its own: nothing to merge
    into one; an error before any weight is read."""
    plan = plan_of(
        recipe_text(
            tied_zoo,
            tmp_path / "out",
            method="task_arithmetic",
            merge="tie_word_embeddings = false",
            models=[("tied", {"weight": 0.5})],
        )
    )
    assert_refused(plan, "tie_word_embeddings = false", "every model ties its head")


# -- 4. bad inputs: an error before any weight is read ----------------------------------------------


def assert_refused(plan: MergePlan, *parts: str) -> None:
    """The plan holds an error naming every one of ``parts``, and running it stops before any
    output is made."""
    text = "\n".join(p.message for p in plan.errors)
    for part in parts:
        assert part in text, f"{part!r} not in the plan's errors:\n{text}"
    with pytest.raises(CompatibilityError):
        run_merge(plan)
    plan.close()
    assert not plan.recipe.output_dir.exists()


def test_token_override_from_a_model_that_lacks_the_token(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    plan = plan_of(
        recipe_text(
            zoo, tmp_path / "out", merge='tokenizer = "union"', tokens='"<|im_end|>" = "models[1]"'
        )
    )
    assert_refused(plan, "'<|im_end|>'", f"models[1] ({zoo['pad']})", "has no token")


def test_token_override_taking_another_token_the_model_lacks(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    plan = plan_of(
        recipe_text(
            zoo,
            tmp_path / "out",
            merge='tokenizer = "union"',
            tokens='"<eot>" = { source = "models[1]", token = "<|im_end|>" }',
        )
    )
    assert_refused(plan, "merge.tokens.'<eot>'.token", "models[1]", "'<|im_end|>'")


def test_token_override_past_the_models_last_row(zoo: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_of(
        recipe_text(
            zoo,
            tmp_path / "out",
            merge='tokenizer = "union"',
            tokens='"<eot>" = { source = "models[0]", token_id = 55 }',
        )
    )
    assert_refused(plan, "token_id", "55", "models[0]", "(54)")


@pytest.mark.parametrize(
    "tokens", ['"<x>" = "models[7]"', '"<x>" = { source = "models[7]", token = "a" }']
)
def test_token_override_naming_a_model_that_does_not_exist(
    tokens: str, zoo: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_text(zoo, tmp_path / "out", merge='tokenizer = "union"', tokens=tokens))
    text = "\n".join(info.value.problems)
    assert "models[7]" in text and "does not exist" in text and "models[3]" in text


def test_base_mean_without_a_base(zoo: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(
            recipe_text(
                zoo,
                tmp_path / "out",
                method="linear",
                base=None,
                merge='tokenizer = "union"\nmissing_tokens = "base_mean"',
                models=[("chat", {"weight": 1.0}), ("pad", {"weight": 1.0})],
            )
        )
    assert any("base_mean" in p and "needs a base model" in p for p in info.value.problems)


def test_unreadable_tokenizer_json(zoo: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(zoo["domain"], broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": garbage', encoding="utf-8")
    plan = plan_of(
        recipe_text({**zoo, "domain": broken}, tmp_path / "out", merge='tokenizer = "union"')
    )
    assert_refused(plan, "models[2]", str(broken / "tokenizer.json"), "cannot read")


def test_model_without_tokenizer_files_under_union(zoo: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_of(
        recipe_text(
            zoo,
            tmp_path / "out",
            merge='tokenizer = "union"',
            models=[
                ("chat", {"weight": 1.0, "density": 0.5}),
                ("bare", {"weight": 1.0, "density": 0.5}),
            ],
        )
    )
    assert_refused(plan, f"models[1] ({zoo['bare']})", "no tokenizer files", 'tokenizer = "base"')


def test_model_without_tokenizer_files_is_assumed_to_have_the_bases(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    """Under ``tokenizer = "base"`` a model without tokenizer files but with the base's row count
    is taken to have the base's vocabulary, as mergekit assumes; with other rows it is an error."""
    same_rows = plan_of(
        recipe_text(zoo, tmp_path / "a", models=[("bare", {"weight": 1.0, "density": 0.5})])
    )
    assert not same_rows.errors
    same_rows.close()
    other_rows = plan_of(
        recipe_text(
            zoo,
            tmp_path / "b",
            models=[("chat", {"weight": 1.0, "density": 0.5})],
            base="bare",
        )
    )
    # the reference (bare) has no tokenizer: rows cannot be aligned by token
    assert_refused(other_rows, "vocabulary size mismatch", "tokenizer files")


def test_chat_template_of_a_model_without_one(zoo: dict[str, Path], tmp_path: Path) -> None:
    plan = plan_of(
        recipe_text(
            zoo,
            tmp_path / "out",
            merge='tokenizer = "union"\nchat_template = "models[1]"',
        )
    )
    assert_refused(plan, "merge.chat_template = models[1]", str(zoo["pad"]), "no chat template")
    assert "models[0] has one" in "\n".join(p.message for p in plan.errors)


# -- 5. the chat template's tokens against the output vocabulary -------------------------------------


def test_chatml_template_without_its_tokens_warns(zoo: dict[str, Path], tmp_path: Path) -> None:
    """ChatML chosen while the output keeps the base's vocabulary: a warning names the missing
    ``<|im_start|>`` and ``<|im_end|>`` and the fix (the union, or the model that has them)."""
    from mergetui.engine.chat_templates import CHATML

    plan = plan_of(
        recipe_text(zoo, tmp_path / "out", merge='tokenizer = "base"\nchat_template = "chatml"')
    )
    assert not plan.errors
    assert plan.vocabulary is not None
    assert check_template_tokens(CHATML, plan.vocabulary) == ["<|im_start|>", "<|im_end|>"]
    warning = next(p.message for p in plan.warnings if "chat template" in p.message)
    assert "'<|im_start|>'" in warning and "'<|im_end|>'" in warning
    assert 'tokenizer = "union" (or "models[0]")' in warning
    plan.close()

    union = plan_of(
        recipe_text(zoo, tmp_path / "out", merge='tokenizer = "union"\nchat_template = "chatml"')
    )
    assert union.vocabulary is not None
    assert check_template_tokens(CHATML, union.vocabulary) == []
    assert not [p for p in union.warnings if "chat template" in p.message]
    union.close()


def test_llama3_template_on_a_chatml_vocabulary_warns(zoo: dict[str, Path], tmp_path: Path) -> None:
    """No model has Llama 3's header tokens: the fix offered is [merge.tokens]."""
    plan = plan_of(
        recipe_text(
            zoo, tmp_path / "out", merge='tokenizer = "models[0]"\nchat_template = "llama3"'
        )
    )
    warning = next(p.message for p in plan.warnings if "chat template" in p.message)
    for token in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert repr(token) in warning
    assert "[merge.tokens]" in warning
    plan.close()


def test_models_own_template_with_its_tokens_does_not_warn(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    plan = plan_of(recipe_text(zoo, tmp_path / "out", merge='tokenizer = "models[0]"'))
    assert not plan.errors
    assert not [p for p in plan.warnings if "chat template" in p.message]
    plan.close()


# -- 6. one vocabulary: nothing changes ------------------------------------------------------------

#: name → ([merge] lines, [merge.tokens] body) that change nothing for models sharing the base's
#: vocabulary (an override of a token every model has, not forced, gives no model a row).
IDENTITY_SETTINGS = {
    "base": ('tokenizer = "base"', ""),
    "base-zero": ('tokenizer = "base"\nmissing_tokens = "zero"', ""),
    "union": ('tokenizer = "union"', ""),
    "override-not-forced": ('tokenizer = "union"', '"a" = "models[1]"\n"<s>" = "zero"'),
}
SAME_MODELS = (
    ("same", {"weight": 1.0, "density": 0.5}),
    ("same2", {"weight": 0.6, "density": 0.5}),
)


@pytest.fixture(scope="module")
def no_vocabulary_key_output(
    zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """TIES of two fine-tunes that kept the base's tokenizer, from a version 1 recipe."""
    folder = tmp_path_factory.mktemp("plain")
    return merge(recipe_text(zoo, folder / "out", models=SAME_MODELS, version=1))


def identity_output(zoo: dict[str, Path], output: Path, setting: str, tokens: str = "") -> Path:
    plan = plan_of(recipe_text(zoo, output, models=SAME_MODELS, merge=setting, tokens=tokens))
    assert not plan.errors
    assert plan.vocabulary is not None and plan.vocabulary.identity
    assert not plan.vocabulary.new_tokens
    assert all(t.vocabulary is None and not t.for_alignment for t in plan.tensors)
    return run_merge(plan).output_dir


@pytest.mark.parametrize("setting", list(IDENTITY_SETTINGS))
def test_shared_vocabulary_is_identity_and_changes_no_byte(
    setting: str, zoo: dict[str, Path], no_vocabulary_key_output: Path, tmp_path: Path
) -> None:
    """Every model has the base's tokens at the same ids and rows: the plan aligns nothing, and
    the weights, config and tokenizer files are the bytes a recipe without any vocabulary key
    writes (only the saved recipe and the model card, which quote the recipe, differ)."""
    out = identity_output(zoo, tmp_path / "out", *IDENTITY_SETTINGS[setting])
    quoting = {"mergetui.toml", "README.md"}
    files = {p.name for p in out.iterdir()} - quoting
    assert files == {p.name for p in no_vocabulary_key_output.iterdir()} - quoting
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    for name in sorted(files):
        assert (out / name).read_bytes() == (no_vocabulary_key_output / name).read_bytes(), name


def test_a_models_identical_vocabulary_is_identity(
    zoo: dict[str, Path], no_vocabulary_key_output: Path, tmp_path: Path
) -> None:
    """``tokenizer = "models[0]"`` with the base's vocabulary: nothing aligned, the same weights
    (config and tokenizer files are that model's own, as the setting says)."""
    out = identity_output(zoo, tmp_path / "out", 'tokenizer = "models[0]"')
    name = "model.safetensors"
    assert (out / name).read_bytes() == (no_vocabulary_key_output / name).read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (zoo["same"] / "tokenizer.json").read_bytes()


# -- 7. tokenizers whose ids do not match the rows one to one ------------------------------------


@pytest.fixture(scope="module")
def gap_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base whose tokenizer skips ids: the demo's 53 tokens at 0..52 and ``<gap>`` at 60, in
    64 rows (a valid tokenizer: ids need not be contiguous), and two fine-tunes that kept it."""
    from mergekit_ref import save_finetune_f32

    root = tmp_path_factory.mktemp("gap-zoo")
    base = save_random_f32(root / "base", llama_config(vocab_size=64), seed=50)
    save_tokenizer(base, {**{token: index for index, token in enumerate(VOCAB)}, "<gap>": 60})
    return {
        "base": base,
        "ft1": save_finetune_f32(base, root / "ft1", seed=51),
        "ft2": save_finetune_f32(base, root / "ft2", seed=52),
    }


def test_tokenizer_with_a_gap_in_its_ids_is_merged_by_index(
    gap_zoo: dict[str, Path], mergekit: MergekitReference, tmp_path: Path
) -> None:
    """Every model shares the base's tokenizer, gap included: nothing to align; the output equals
    mergekit's (which, without ``tokenizer_source``, merges rows by index) and ``<gap>``'s id
    indexes its own merged row."""
    plan = plan_of(
        recipe_text(
            gap_zoo,
            tmp_path / "mergetui",
            models=[
                ("ft1", {"weight": 1.0, "density": 0.5}),
                ("ft2", {"weight": 0.6, "density": 0.5}),
            ],
            version=1,
        )
    )
    assert not plan.errors
    ours = run_merge(plan).output_dir
    theirs = mergekit.merge(
        textwrap.dedent(
            """
            models:
              - model: {ft1}
                parameters: {{weight: 1.0, density: 0.5}}
              - model: {ft2}
                parameters: {{weight: 0.6, density: 0.5}}
            merge_method: ties
            base_model: {base}
            dtype: float32
            """
        ).format(**gap_zoo),
        tmp_path / "mergekit",
    )
    assert_same_tensors(read_tensors(ours), read_tensors(theirs), ours, theirs, rel=EXACT)
    assert plan.vocabulary is not None and plan.vocabulary.identity


def outgrown_base(zoo: dict[str, Path], folder: Path) -> dict[str, Path]:
    """The zoo with a base whose tokenizer gained a special token (``<extra>``, id 53) without
    the model being resized: 54 tokens, 53 rows (a fine-tune saved before its resize)."""
    from transformers import AutoTokenizer

    base = folder / "outgrown"
    shutil.copytree(zoo["base"], base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<extra>"], special_tokens=True)
    tokenizer.save_pretrained(base)
    return {**zoo, "base": base}


def assert_refused_or_consistent(plan: MergePlan) -> None:
    """The plan refuses the tokenizer up front, naming ``<extra>``; or the merge runs and its
    tokenizer has no token without a row (``<extra>`` left out, as the plan says)."""
    from transformers import AutoTokenizer

    if plan.errors:
        assert "<extra>" in "\n".join(p.message for p in plan.errors)
        plan.close()
        return
    out = run_merge(plan).output_dir
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = config_of(out)["vocab_size"]
    assert read_tensors(out)[EMBED].shape[0] == rows
    assert max(tokenizer.get_vocab().values()) < rows and len(tokenizer) <= rows
    assert "<extra>" not in tokenizer.get_vocab()


def test_union_with_a_base_tokenizer_past_its_rows(zoo: dict[str, Path], tmp_path: Path) -> None:
    models = outgrown_base(zoo, tmp_path)
    plan = plan_of(
        recipe_text(
            models,
            tmp_path / "out",
            merge='tokenizer = "union"',
            models=[("chat", {"weight": 1.0, "density": 0.5})],
        )
    )
    note = next(p.message for p in plan.warnings if "past its 53 embedding rows" in p.message)
    assert "left out of the vocabulary" in note
    assert_refused_or_consistent(plan)


def test_base_tokenizer_past_its_rows(zoo: dict[str, Path], tmp_path: Path) -> None:
    models = outgrown_base(zoo, tmp_path)
    plan = plan_of(
        recipe_text(
            models,
            tmp_path / "out",
            merge='tokenizer = "base"',
            models=[("chat", {"weight": 1.0, "density": 0.5})],
        )
    )
    assert any("left out of the vocabulary" in p.message for p in plan.warnings)
    assert_refused_or_consistent(plan)


def test_fine_tune_tokenizer_past_its_rows_is_left_out_of_a_union(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    """A fine-tune (not the tokenizer source) whose tokenizer outgrew its rows: the token it has
    no row for is not in the union; the merge runs and its tokenizer matches its rows."""
    from transformers import AutoTokenizer

    outgrown = outgrown_base(zoo, tmp_path)["base"]
    out = merge(
        recipe_text(
            {**zoo, "outgrown": outgrown},
            tmp_path / "out",
            merge='tokenizer = "union"',
            models=[
                ("outgrown", {"weight": 1.0, "density": 0.5}),
                ("chat", {"weight": 1.0, "density": 0.5}),
            ],
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<extra>" not in tokenizer.get_vocab()
    assert len(tokenizer) == config_of(out)["vocab_size"] == read_tensors(out)[EMBED].shape[0]
