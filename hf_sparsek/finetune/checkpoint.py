"""Writing and reloading what a fine-tune produces, with the pattern it trained under.

A full fine-tune is a plain checkpoint whose ``config.sparsek`` holds the pattern. A LoRA adapter cannot carry it:
peft's loaders (``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``) restore the adapter's config and weights
but nothing of the base model's config, so every saved adapter (final and each Trainer checkpoint) gets
``sparsek_pattern.json`` and a README note; ``hf_sparsek.set_pattern(base, "<adapter>/sparsek_pattern.json")``
restores it, :func:`load_finetuned` does so itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import base_model

if TYPE_CHECKING:
    import torch

PATTERN_FILE = "sparsek_pattern.json"
ADAPTER_README_NOTE = """
## Sparse attention (hf_sparsek)

This adapter was trained with `attn_implementation="sparsek"` under the pattern in `{pattern_file}`. peft restores
the LoRA weights but not the base model's attention pattern: set it on the base model before running the adapter:

```python
import hf_sparsek
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained(base_model, attn_implementation="sparsek")
hf_sparsek.set_pattern(base, "<this folder>/{pattern_file}")
model = PeftModel.from_pretrained(base, "<this folder>")
```
"""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_finetuned(path: str | os.PathLike, attn: str = "sparsek", merge: bool = False) -> torch.nn.Module:
    """Reload a ``finetune`` output: a full checkpoint folder, or a LoRA adapter folder (attached, or merged).

    An adapter folder carries ``sparsek_pattern.json``: the pattern the adapter was trained under is set on the base.
    """
    from transformers import AutoModelForCausalLM

    import hf_sparsek

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_path, attn_implementation=attn)
    if hf_sparsek.is_sparsek_implementation(attn) and (path / PATTERN_FILE).is_file():
        hf_sparsek.set_pattern(base, str(path / PATTERN_FILE))
    model = PeftModel.from_pretrained(base, path)
    return model.merge_and_unload() if merge else model


def write_adapter_pattern(model: Any, directory: str | os.PathLike) -> Path | None:
    """Write the sparse pattern a peft model trains under beside its saved adapter: ``sparsek_pattern.json`` plus a
    note in the adapter's README.md. Returns the file, or None for a model without a sparsek pattern (dense)."""
    sparsek = getattr(base_model(model).config, "sparsek", None)
    if sparsek is None:
        return None
    directory = Path(directory)
    path = directory / PATTERN_FILE
    path.write_text(json.dumps(sparsek, indent=2))
    readme = directory / "README.md"
    note = ADAPTER_README_NOTE.format(pattern_file=PATTERN_FILE)
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if note not in text:
        readme.write_text(text + note, encoding="utf-8")
    return path


def save_final(trainer: Any, final_dir: Path, merge_lora: bool = True) -> None:
    """Write the final model: a full checkpoint, or for LoRA the adapter (+ its pattern) in ``adapter`` and the
    merged model in ``final_dir``.

    Call on every process: under FSDP ``trainer.save_model`` gathers the full state dict (a collective); the files
    are written by the main process.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_lora = hasattr(model, "peft_config")
    target = final_dir / "adapter" if is_lora else final_dir
    trainer.save_model(str(target))
    if not (is_lora and trainer.is_world_process_zero()):
        return
    base_config = model.get_base_model().config
    write_adapter_pattern(model, target)
    if merge_lora:
        load_finetuned(target, attn=base_config._attn_implementation, merge=True).save_pretrained(final_dir)


def copy_tokenizer(model_path: str, final_dir: Path) -> None:
    """Save the base model's tokenizer beside the final weights, when the base has one."""
    from transformers import AutoTokenizer

    if any((Path(model_path) / f).is_file() for f in TOKENIZER_FILES):
        AutoTokenizer.from_pretrained(model_path).save_pretrained(final_dir)
