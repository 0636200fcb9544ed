"""One fine-tune through the HF Trainer: load, pack, train, evaluate held-out perplexity, save.

:func:`finetune` is what ``hf-sparsek finetune`` runs; call it from Python with a :class:`FinetuneConfig`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import copy_tokenizer, save_final, write_adapter_pattern
from .checks import check_kernel, check_seq_len
from .config import FinetuneConfig
from .data import training_documents
from .evaluation import attention, heldout_nll
from .model import add_lora, base_model, load_model, pattern_parameters, resolve_model_path

# torch and transformers are imported inside the functions: building the command line stays light.
if TYPE_CHECKING:
    import torch

LOSS_LOG = "loss_log.jsonl"
METRICS_FILE = "metrics.json"
FINAL_DIR = "final"


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the metrics summary (also in ``metrics.json``) and the trained model."""

    metrics: dict[str, Any]
    model: torch.nn.Module


def finetune(config: FinetuneConfig) -> FinetuneResult:
    """Run one fine-tune; returns the metrics summary (also written to ``<output_dir>/metrics.json``) and the model.

    Writes to ``config.output_dir``: Trainer checkpoints (every ``save_steps``), ``loss_log.jsonl`` (every log line)
    and ``final/`` (the full model; for LoRA the merged model there and the adapter with its pattern in
    ``final/adapter``). Bad settings raise a ValueError before the model loads (the config) or before training
    starts (the checks against the model).
    """
    import torch
    from transformers import set_seed

    from .packing import PackedDataset, collate_packed, document_rows, pack_documents

    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"finetune() takes a FinetuneConfig, got {type(config).__name__}; from parsed command-line "
                        "options use hf_sparsek.finetune.cli.config_from_args(args)")
    model_path = resolve_model_path(config.model)  # bad input fails here and in load_model, before the Trainer import
    set_seed(config.seed)
    device = "cuda" if torch.cuda.is_available() and not config.cpu else "cpu"
    model = load_model(
        model_path, attn=config.attn, pattern=config.pattern, seq_len=config.seq_len, device=device,
        dtype=config.dtype, attention_dropout_zero=config.attention_dropout_zero,
        allow_reference=config.allow_reference,
    )
    if config.eval_seq_len:
        check_seq_len(model.config, config.eval_seq_len, "eval_seq_len")
    from hf_sparsek.learned import selector_for, uses_learned_selector

    learned = config.attn == "sparsek" and uses_learned_selector(model.config)
    if learned:  # fails here, before training, when the model has no scorer
        selector_for(model.config)
    if config.train_only_pattern:
        _freeze_all_but_pattern(model)
    if config.lora_r:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_targets)

    docs, eval_docs = training_documents(config, base_model(model).config.vocab_size, model_path)
    # the learned selector scores a row as one sequence: rows cut from single documents, no packing
    single = learned or config.single_documents
    rows = document_rows(docs, config.seq_len) if single else pack_documents(docs, config.seq_len)
    if not rows:
        raise ValueError(f"the training data gives no full row of {config.seq_len} tokens"
                         + (" from a single document (rows are not packed across documents)" if single else ""))
    dataset = PackedDataset(rows)

    from transformers import Trainer

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    autocast = _autocast_dtype(config.dtype)
    eval_len = config.eval_seq_len or config.seq_len
    targs = _training_arguments(config, out, device)
    eval_steps = config.eval_steps if eval_docs else 0
    callbacks = _callbacks(out / LOSS_LOG, eval_docs, eval_len, eval_steps, autocast, config.eval_max_windows)
    trainer = Trainer(
        model=model, args=targs, train_dataset=dataset, data_collator=collate_packed, callbacks=callbacks,
    )
    base_config = base_model(model).config
    metrics: dict[str, Any] = {
        "model": config.model, "attn": config.attn, "seq_len": config.seq_len, "dtype": config.dtype,
        "lora_r": config.lora_r, "train_rows": len(rows), "rows": "documents" if single else "packed",
        "world_size": targs.world_size,
        "sparsek": getattr(base_config, "sparsek", None) if config.attn == "sparsek" else None,
        "eval_seq_len": eval_len if eval_docs else None,
        "backend": check_kernel(base_config, config.dtype, device, True) if config.attn == "sparsek" else None,
    }

    def evaluate(tag: str) -> None:
        metrics[tag] = heldout_nll(trainer.model, eval_docs, eval_len, autocast, config.eval_max_windows)
        print(f"held-out ppl {tag} ({config.attn}): {metrics[tag]['ppl']:.3f}", file=sys.stderr)
        if config.eval_also_attn:
            with attention(base_model(trainer.model), config.eval_also_attn, config.eval_pattern or config.pattern):
                other = heldout_nll(trainer.model, eval_docs, eval_len, autocast, config.eval_max_windows)
            metrics[f"{tag}_{config.eval_also_attn}"] = other
            print(f"held-out ppl {tag} ({config.eval_also_attn}): {other['ppl']:.3f}", file=sys.stderr)

    if eval_docs and config.eval_before and not config.resume:
        evaluate("eval_before")
    resume: bool | str | None = None
    if config.resume:
        resume = True if config.resume == "last" else config.resume
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    metrics["train_seconds"] = time.time() - start
    metrics["train_loss"] = result.training_loss
    metrics["steps_this_run"] = result.global_step - callbacks[0].first_step
    metrics["train_tokens_per_second"] = (
        (metrics["steps_this_run"] * config.batch_size * config.grad_accum * targs.world_size * config.seq_len)
        / max(metrics["train_seconds"], 1e-9)
    )
    metrics["losses"] = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if eval_docs:
        evaluate("eval_after")
    save_final(trainer, out / FINAL_DIR, merge_lora=config.merge_lora)
    if trainer.is_world_process_zero():
        copy_tokenizer(model_path, out / FINAL_DIR)
        if learned:  # the scorer (frozen here) goes with the weights: from_pretrained(final) selects as trained
            from hf_sparsek.learned import save_selector

            save_selector(selector_for(base_config), out / FINAL_DIR)
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(metrics, trainer.model)


def _freeze_all_but_pattern(model: torch.nn.Module) -> None:
    """``train_only_pattern``: only the pattern's own parameters train; ValueError when it has none (today)."""
    params = pattern_parameters(model)
    if not params:
        raise ValueError(
            "--train-only-pattern: this model's sparsity pattern has no trainable parameters among the model's (the "
            "shipped patterns are parameter-free; a learned selector's scorer lives outside the model and trains "
            "with `hf-sparsek distill`), so training only the pattern would change nothing. Use full fine-tuning "
            "or --lora-r"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def _autocast_dtype(dtype: str) -> torch.dtype | None:
    """The autocast dtype of a ``--dtype`` (None for fp32: no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[dtype]


def _training_arguments(config: FinetuneConfig, out: Path, device: str) -> Any:
    """The Trainer's TrainingArguments for ``config``."""
    from transformers import TrainingArguments

    targs = TrainingArguments(
        output_dir=str(out), max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.lr, lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay, max_grad_norm=1.0,
        bf16=config.dtype == "bf16", fp16=config.dtype == "fp16", use_cpu=device == "cpu",
        **_checkpointing_kwargs(config.gradient_checkpointing),
        logging_steps=config.logging_steps, save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        save_strategy="steps" if config.save_steps > 0 else "no", report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, seed=config.seed, disable_tqdm=False, ddp_find_unused_parameters=False,
    )
    if config.data_order != "random":
        if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
            raise ValueError("--data-order sequential needs a transformers version with train_sampling_strategy")
        targs.train_sampling_strategy = config.data_order
    return targs


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing options under the name this transformers version uses (renamed in 5.2x)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else (
        "gradient_checkpointing")
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def _callbacks(log_path: Path, eval_docs: list[list[int]] | None, eval_len: int, eval_steps: int,
               autocast: torch.dtype | None, max_windows: int | None) -> list[Any]:
    """[loss log, periodic held-out eval, adapter pattern writer]: the first remembers the step a run started at."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class LossLog(TrainerCallback):
        """Appends every Trainer log (loss, lr, grad norm, eval) as one JSON line, main process only; remembers the
        step this call started from (after a resume) for the throughput."""

        first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.first_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero and logs:
                with log_path.open("a") as f:
                    f.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")

    class HeldoutEval(TrainerCallback):
        """Held-out perplexity every ``eval_steps`` optimizer steps (added to the Trainer log)."""

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if eval_docs and eval_steps > 0 and state.global_step % eval_steps == 0 and model is not None:
                result = heldout_nll(model, eval_docs, eval_len, autocast, max_windows)
                entry = {"step": state.global_step, "eval_ppl": result["ppl"], "eval_nll": result["nll"]}
                state.log_history.append(entry)
                if state.is_world_process_zero:
                    with log_path.open("a") as f:
                        f.write(json.dumps(entry) + "\n")
                    print(f"step {state.global_step}: held-out ppl {result['ppl']:.3f}", file=sys.stderr)

    class AdapterPattern(TrainerCallback):
        """Writes the pattern file beside the adapter of every LoRA checkpoint (peft does not save it)."""

        def on_save(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if state.is_world_process_zero and model is not None and hasattr(model, "peft_config"):
                folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                if folder.is_dir():
                    write_adapter_pattern(model, folder)

    return [LossLog(), HeldoutEval(), AdapterPattern()]
