"""Small, deterministic demo models built locally, so the quickstart needs no network or download.

The demo is a tiny Llama-style base model with a character-level tokenizer and two "fine-tunes" of it:
the base plus seeded task vectors — a dense, small one and a sparse, larger one per specialist, the
shape of real fine-tuning deltas that TIES and DARE are designed for. Everything is seeded, so every
machine builds byte-identical models, and they are cached in the demo folder after the first run.
"""

from __future__ import annotations

import importlib.resources
import string
from pathlib import Path

DEMO_RECIPE = "demo-ties.toml"
MODEL_NAMES = ("base", "ft-code", "ft-math")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = list(SPECIAL_TOKENS) + list(string.ascii_lowercase + string.digits + " +-*/=().,:;\n")


def bundled_recipe_text(name: str = DEMO_RECIPE) -> str:
    """A recipe shipped with the package (from ``recipes/`` in the source tree)."""
    packaged = importlib.resources.files("mergetui").joinpath("_recipes", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source_tree = Path(__file__).resolve().parent.parent / "recipes" / name
    return source_tree.read_text(encoding="utf-8")


def save_char_tokenizer(directory: Path) -> None:
    """A character-level fast tokenizer, built offline with the ``tokenizers`` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    tokenizer.save_pretrained(directory)


def build_base(directory: Path, seed: int = 0) -> None:
    """Save a tiny Llama-style base model with random (seeded) weights and the demo tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    save_char_tokenizer(directory)


def build_finetune(base_dir: Path, directory: Path, seed: int) -> None:
    """Save ``base + task vector``: small dense noise plus a sparse set of larger changes."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            scale = float(param.float().std()) if param.numel() > 1 else 0.02
            dense = torch.randn(param.shape, generator=generator) * 0.02 * scale
            sparse_mask = torch.rand(param.shape, generator=generator) < 0.05
            sparse = torch.randn(param.shape, generator=generator) * 0.5 * scale * sparse_mask
            param.add_((dense + sparse).to(param.dtype))
    model.save_pretrained(directory)
    save_char_tokenizer(directory)


def _quiet_transformers() -> None:
    """The demo prints its own progress; transformers' per-file bars would only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_demo_models(root: Path, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the demo models under ``root/models``; returns name → folder."""
    _quiet_transformers()
    folders = {name: root / "models" / name for name in MODEL_NAMES}
    for index, (name, folder) in enumerate(folders.items()):
        if (folder / "config.json").is_file() and not force:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        if name == "base":
            build_base(folder)
        else:
            build_finetune(folders["base"], folder, seed=1000 + index)
    return folders


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy generation from a saved model: the proof that the output loads and runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
