"""Rows realigned to another vocabulary, merged in blocks of output rows with the bits of the
whole realignment.

A block's rows are gathered from where each model stores them (runs of consecutive rows), its
missing and forced tokens filled in (``borrow`` takes the holders' rows, which the block holds),
and the two whole-tensor means (the base's mean row for ``missing_tokens = "base_mean"``, each
model's mean token row for padding rows) found in a pass of their own first, summed in groups of
``rows_per_chunk`` rows. The models: a base with 8192 tokens, 512 wide (2048 rows a group), a chat
fine-tune that appended two tokens, and a fine-tune whose retrained vocabulary lacks ``t5`` (every
later token one row lower).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from blocks_helpers import assert_same_bits, merge, tensors_of
from conftest import CHECK_DEVICE, method_recipe, on_check_device, save_llama

from mergetui.methods.registry import METHODS, BlockPlan, rows_per_chunk

TOKENS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"t{i}" for i in range(8188)]
SHAPE = dict(
    vocab_size=len(TOKENS),
    hidden_size=512,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _save_slim(base: Path, directory: Path, seed: int, drop: str) -> Path:
    """A fine-tune whose vocabulary was retrained without ``drop``: its rows without that row,
    then seeded noise."""
    import torch
    from test_vocabulary import save_tokenizer
    from transformers import AutoModelForCausalLM

    keep = [index for index, token in enumerate(TOKENS) if token != drop]
    save_tokenizer(directory, [TOKENS[index] for index in keep])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    embedding = model.model.embed_tokens.weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    model.resize_token_embeddings(len(keep))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embedding[keep])
        model.lm_head.weight.copy_(head[keep])
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_vocabulary import add_chat_tokens, save_resized_finetune, save_tokenizer

    root = tmp_path_factory.mktemp("vocabularies")
    base = save_llama(root / "base", seed=30, dtype="float32", **SHAPE)
    save_tokenizer(base, TOKENS)
    return {
        "base": base,
        "chat": save_resized_finetune(base, root / "chat", seed=31, edit=add_chat_tokens),
        "slim": _save_slim(base, root / "slim", seed=32, drop="t5"),
    }


#: name → (method, [merge] lines, [merge.tokens] body, the alignment's statistics passes)
CASES = {
    "union-borrow": ("linear", 'tokenizer = "union"\n', "", 0),
    "union-padded": ("ties", 'tokenizer = "union"\npad_to_multiple_of = 64\n', "", 1),
    "base_mean-padded": (
        "dare_ties",
        'tokenizer = "union"\nmissing_tokens = "base_mean"\npad_to_multiple_of = 64\n',
        "",
        2,
    ),
    "forced-and-borrowed-rows": (
        "task_arithmetic",
        'tokenizer = "union"\n',
        '"<|im_end|>" = { source = "models[0]", force = true }\n'
        '"t7" = { source = "models[1]", token = "t9", force = true }\n',
        0,
    ),
    "base-vocabulary-zero": ("linear", 'tokenizer = "base"\nmissing_tokens = "zero"\n', "", 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_realigned_rows_in_blocks_give_the_whole_tensor_bits(
    case: str, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    method, lines, tokens, statistics = CASES[case]
    models = [vocabularies["chat"], vocabularies["slim"]]
    text = method_recipe(method, vocabularies["base"], models, tmp_path / "whole")
    text = text.replace("seed = 7\n", f"seed = 7\n{lines}").replace("version = 1", "version = 2")
    if tokens:
        text = text.replace("[merge.parameters]\n", f"[merge.tokens]\n{tokens}[merge.parameters]\n")
    whole, whole_plan = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=24 << 20)
    for name in VOCABULARY_TENSORS:
        tensor = next(t for t in plan.tensors if t.name == name)
        vocabulary = tensor.vocabulary
        assert vocabulary is not None
        assert not vocabulary.keeps_stored_rows(read.role for read in tensor.reads)
        assert tensor.block_rows is not None and tensor.shape[0] // tensor.block_rows >= 2
        how = METHODS[method].block_plan(tensor.shape, tensor.params, tuple(tensor.model_params))
        assert isinstance(how, BlockPlan)
        assert tensor.passes == how.passes + statistics
        if statistics:
            assert tensor.block_rows % rows_per_chunk(512) == 0
    assert plan.memory is not None and plan.memory.over_budget == ()
    assert_same_bits(whole, blocked)


@pytest.fixture(scope="module")
def slim_adapter(vocabularies: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the slim fine-tune's embedding and head: its rows are realigned (one
    row lower from ``t6`` on), so gathered runs start inside the adapter's product groups."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_pretrained(vocabularies["slim"], dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts one of each pair at zero
                param.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("slim-adapter")
    peft_model.save_pretrained(folder)
    return folder


def test_realigned_rows_with_a_lora_adapter_in_blocks_give_the_whole_tensor_bits(
    vocabularies: dict[str, Path], slim_adapter: Path, tmp_path: Path
) -> None:
    """The adapter's ``B @ A`` is made in groups of stored rows; a gathered run that starts or
    ends inside a group reads that group whole, so each row gets the product the whole tensor
    gives it (an override row taken from the adapted model too)."""
    _, lines, tokens, _ = CASES["forced-and-borrowed-rows"]
    models = [vocabularies["chat"], vocabularies["slim"]]
    text = method_recipe("ties", vocabularies["base"], models, tmp_path / "whole")
    text = text.replace("seed = 7\n", f"seed = 7\n{lines}pad_to_multiple_of = 64\n")
    text = text.replace("version = 1", "version = 2")
    text = text.replace("[merge.parameters]\n", f"[merge.tokens]\n{tokens}[merge.parameters]\n")
    head, chat, slim = text.split("[[models]]\n")
    text = "[[models]]\n".join([head, chat, f'lora = "{slim_adapter}"\n{slim}'])
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=24 << 20)
    for name in VOCABULARY_TENSORS:
        tensor = next(t for t in plan.tensors if t.name == name)
        assert tensor.block_rows is not None and tensor.shape[0] // tensor.block_rows >= 2
    assert_same_bits(whole, blocked)
    plain = merge(
        text.replace(f'lora = "{slim_adapter}"\n', "").replace("whole", "plain"), tmp_path
    )
    assert not torch.equal(
        tensors_of(plain[0])[VOCABULARY_TENSORS[0]], tensors_of(whole)[VOCABULARY_TENSORS[0]]
    )  # the adapter was folded in


@on_check_device
@pytest.mark.parametrize("case", ["base_mean-padded", "forced-and-borrowed-rows"])
def test_realigned_rows_in_blocks_on_the_check_device(
    case: str, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """On the GPU (``bench/gpu_check.sh``): blocks of realigned rows give the bits of the whole
    realignment on the device, and the CPU's result to float tolerance."""
    method, lines, tokens, _ = CASES[case]
    models = [vocabularies["chat"], vocabularies["slim"]]

    def text_for(output: str, device: str) -> str:
        text = method_recipe(method, vocabularies["base"], models, tmp_path / output, device=device)
        text = text.replace("seed = 7\n", f"seed = 7\n{lines}").replace(
            "version = 1", "version = 2"
        )
        if tokens:
            text = text.replace(
                "[merge.parameters]\n", f"[merge.tokens]\n{tokens}[merge.parameters]\n"
            )
        return text

    on_cpu, _ = merge(text_for("on-cpu", "cpu"), tmp_path)
    whole, _ = merge(text_for("whole", CHECK_DEVICE), tmp_path)
    blocked, plan = merge(text_for("blocked", CHECK_DEVICE), tmp_path, working=24 << 20)
    assert all(tensor.block_rows for tensor in plan.tensors if tensor.vocabulary is not None)
    assert_same_bits(whole, blocked)
    expected, found = tensors_of(on_cpu), tensors_of(whole)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
