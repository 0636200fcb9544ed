"""``hf-sparsek finetune``: causal-LM fine-tuning with ``attn_implementation="sparsek"`` through the HF Trainer.

Why: a model fine-tuned under its sparsity pattern loses less perplexity than one that meets the pattern only at
inference, and sparse attention trains at lengths where dense attention is too slow or too big.

What it does: loads a causal LM with the chosen attention (``sparsek`` with a pattern, or ``sdpa``/``eager`` as the
dense baseline), packs token-id documents to the training length (positions restart per document, no attention
across documents, see :mod:`hf_sparsek.scripts.packing`), trains in full or with LoRA (peft) in bf16 with gradient
checkpointing, evaluates held-out perplexity before, periodically and after, logs the loss to ``loss_log.jsonl``
and writes resumable Trainer checkpoints. Multi-GPU: launch the same command through ``accelerate launch
--config_file scripts/accelerate_ddp.yaml`` (or ``accelerate_fsdp.yaml``).

The final model goes to ``<output_dir>/final``: a full checkpoint (``from_pretrained(final,
attn_implementation="sparsek")`` restores the pattern from ``config.sparsek``), or for LoRA the merged model there
plus the adapter in ``final/adapter`` (reload either with :func:`load_finetuned`). Every saved adapter (final and
each Trainer checkpoint) carries ``sparsek_pattern.json``: peft's own loaders (``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM``) restore the adapter's config and weights but nothing of the base model's config, so
set the pattern on the base with ``hf_sparsek.set_pattern(base, "<adapter>/sparsek_pattern.json")``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_sparsek.cli import (
    CliParser,
    apply_pattern,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)

# torch, transformers and hf_sparsek's modules are imported inside the functions that use them, so that building the
# command line (``hf-sparsek finetune --help``) stays light.
if TYPE_CHECKING:
    import torch

    import hf_sparsek

ATTN_CHOICES = ("sparsek", "sdpa", "eager")
DTYPE_CHOICES = ("bf16", "fp16", "fp32")
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj"
PATTERN_FILE = "sparsek_pattern.json"


# --------------------------------------------------------------------------------------------------- validation
def check_model_type(config: Any) -> type:
    """The causal-LM class of ``config``; ValueError when transformers has none or it cannot take "sparsek"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"model type {model_type!r} has no causal-LM class in transformers; finetune supports decoder-only "
            f"causal LMs such as llama, mistral, qwen2, qwen3, gemma3_text, phi3"
        )
    import transformers

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if cls is None or not getattr(cls, "_supports_attention_backend", False):
        raise ValueError(
            f"model type {model_type!r} ({MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}) does not route attention "
            "through transformers' AttentionInterface, so attn_implementation='sparsek' cannot run it"
        )
    return cls


def check_seq_len(config: Any, seq_len: int) -> None:
    """ValueError when the training length exceeds the model's position range."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > int(limit):
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's max_position_embeddings={limit}; use seq_len <= {limit} "
            "or a model (or RoPE scaling in its config) that covers the length"
        )
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")


def check_dtype(dtype: str, device: str) -> None:
    """ValueError for a training precision this device (or the sparse kernels) cannot train in."""
    import torch

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r}; supported: {DTYPE_CHOICES}")
    if device == "cuda":
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"bf16 was requested but this GPU ({torch.cuda.get_device_name()}) has no bf16 support; use "
                "--dtype fp16 or fp32"
            )
    elif dtype == "fp16":
        raise ValueError("fp16 mixed-precision training needs a CUDA device; on CPU use --dtype bf16 or fp32")


def check_kernel(config: Any, dtype: str, device: str, allow_reference: bool = False) -> str:
    """Which backend will train the sparse layers: "triton" on CUDA when the kernel takes this head dim and dtype.

    On CUDA a model the kernel cannot run raises (the PyTorch reference is exact but far too slow and big to train
    at long lengths) unless ``allow_reference``; on CPU the reference is the only backend and is returned as such.
    """
    import torch

    if device != "cuda":
        return "reference"
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    reason = _kernel_reason(head_dim, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    if reason is None:
        return "triton"
    if not allow_reference:
        raise ValueError(
            f"the sparse attention kernel cannot train this model in {dtype}: {reason}. Use another --dtype, "
            "--attn sdpa, or --allow-reference to train with the (slow, exact) PyTorch reference"
        )
    return "reference"


def _kernel_reason(head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the Triton kernel cannot run (head_dim, dtype) on this GPU, or None."""
    import torch

    from hf_sparsek.ops import triton_unsupported_reason

    probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device="cuda")
    return triton_unsupported_reason(probe, probe, probe)


def check_attention_dropout(config: Any, attn: str) -> None:
    """Sparse attention has no dropout: refuse rather than silently train without it."""
    p = float(getattr(config, "attention_dropout", 0.0) or 0.0)
    if attn == "sparsek" and p > 0:
        raise ValueError(
            f"the model config has attention_dropout={p}; attn_implementation='sparsek' has no attention dropout. "
            "Set --attention-dropout-zero to train with 0"
        )


def pattern_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters that belong to the sparsity pattern itself (a learned scorer); none exist today."""
    return [p for name, p in model.named_parameters() if "sparsek" in name.lower()]


# --------------------------------------------------------------------------------------------------- model
def resolve_model_path(name: str) -> str:
    """What ``from_pretrained`` loads for ``--model``: a local folder as is, an offline name converted once (through
    hf_sparsek.eval.offline), else a hub id as is. ValueError for a path that does not exist."""
    from hf_sparsek.eval.offline import OFFLINE_MODELS, is_offline_model, resolve_model

    if os.path.isdir(name):
        return name
    if is_offline_model(name):
        return str(resolve_model(name))
    if os.path.isabs(os.path.expanduser(name)) or name.startswith((".", "~")) or os.path.exists(name):
        raise ValueError(f"--model {name!r}: no such checkpoint folder; give a local checkpoint folder, an offline "
                         f"name ({', '.join(OFFLINE_MODELS)}) or a hub id")
    return name


def load_model(
    model_path: str,
    attn: str = "sparsek",
    pattern: str | dict | hf_sparsek.SparsePattern | hf_sparsek.ModelSparsity | None = None,
    seq_len: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    attention_dropout_zero: bool = False,
    allow_reference: bool = False,
) -> torch.nn.Module:
    """Load a causal LM in fp32 weights (the Trainer's autocast does bf16/fp16) with the chosen attention."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_sparsek

    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn={attn!r}; supported: {ATTN_CHOICES}")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"cannot read a transformers config from {model_path!r}: {exc}") from exc
    check_model_type(config)
    if seq_len is not None:
        check_seq_len(config, seq_len)
    check_dtype(dtype, device)
    if attn == "sparsek":
        check_kernel(config, dtype, device, allow_reference)
    if attention_dropout_zero and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0
    check_attention_dropout(config, attn)
    if attn == "sparsek" and pattern is not None:
        _set_pattern(config, pattern)  # validates: ModelSparsity raises on bad fields
    elif attn == "sparsek":
        hf_sparsek.model_sparsity(config)  # validates the stored pattern (or writes the default)
    config.use_cache = False
    model = AutoModelForCausalLM.from_pretrained(
        model_path, config=config, attn_implementation=attn, dtype=torch.float32
    )
    return model


def _set_pattern(target: Any, pattern: Any, option: str = "--pattern") -> Any:
    """``hf_sparsek.set_pattern`` for a command-line string (an error names ``option``) or a pattern object."""
    if isinstance(pattern, str):
        return apply_pattern(target, pattern, option)
    import hf_sparsek

    return hf_sparsek.set_pattern(target, pattern)


def add_lora(model: torch.nn.Module, r: int, alpha: int, targets: str, dropout: float = 0.0) -> torch.nn.Module:
    """Wrap ``model`` with a peft LoRA adapter on the named linear layers."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ValueError("LoRA needs peft: pip install 'hf-sparsek[train]'") from exc
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=[t.strip() for t in targets.split(",") if t],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_finetuned(path: str | os.PathLike, attn: str = "sparsek", merge: bool = False) -> torch.nn.Module:
    """Reload a ``finetune`` output: a full checkpoint dir, or a LoRA adapter dir (attached, or merged if asked).

    An adapter dir carries ``sparsek_pattern.json``: the pattern the adapter was trained under is set on the base.
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


# --------------------------------------------------------------------------------------------------- data
def load_token_documents(source: str, tokenizer_path: str | None = None) -> list[list[int]]:
    """Token-id documents from a ``.pt``/``.json`` file (a list of lists of ints) or a text source name.

    A text source (``shakespeare``) goes through ``hf_sparsek.eval.offline.load_documents`` and the model's
    tokenizer (no BOS/EOS added: each play is one document).
    """
    import torch

    path = Path(source)
    if path.suffix == ".pt" and path.is_file():
        docs = torch.load(path)
    elif path.suffix == ".json" and path.is_file():
        docs = json.loads(path.read_text())
    else:
        try:
            from hf_sparsek.eval.offline import load_documents
        except ImportError as exc:
            raise ValueError(
                f"data {source!r}: not a .pt/.json token file, and hf_sparsek.eval.offline is missing"
            ) from exc
        if tokenizer_path is None:
            raise ValueError("a text data source needs the model's tokenizer (--model dir with tokenizer files)")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        docs = [tok(text, add_special_tokens=False)["input_ids"] for text in load_documents(source)]
    if not isinstance(docs, list) or not docs or not all(isinstance(d, (list, tuple)) for d in docs):
        raise ValueError(f"data {source!r} must hold a non-empty list of token-id lists")
    return [list(map(int, d)) for d in docs]


def synthetic_documents(n_docs: int, vocab: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """Learnable synthetic documents (for tests and throughput): each repeats a short random motif."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        motif = torch.randint(0, vocab, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen)
        docs.append(motif.repeat(length // len(motif) + 1)[:length].tolist())
    return docs


# --------------------------------------------------------------------------------------------------- evaluation
def heldout_nll(
    model: torch.nn.Module, docs: Sequence[Sequence[int]], seq_len: int, autocast_dtype: torch.dtype | None = None,
    max_windows: int | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token NLL over held-out documents, in non-overlapping windows of ``seq_len``.

    Each window is one forward pass (batch 1, positions from 0, no padding). Windows shorter than 2 tokens are
    skipped. Returns ``{"nll", "ppl", "tokens", "windows"}``.
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, windows = 0.0, 0, 0
    for doc in docs:
        for start in range(0, len(doc), seq_len):
            window = doc[start : start + seq_len]
            if len(window) < 2 or (max_windows is not None and windows >= max_windows):
                continue
            ids = torch.tensor([window], device=device)
            with torch.no_grad():
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(input_ids=ids).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            total += float(loss)
            count += len(window) - 1
            windows += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("held-out data has no window of at least 2 tokens")
    nll = total / count
    return {"nll": nll, "ppl": math.exp(nll), "tokens": count, "windows": windows}


@contextlib.contextmanager
def attention(model: torch.nn.Module, attn: str, pattern: Any = None) -> Iterator[None]:
    """Run ``model`` with another attention inside the block (``sparsek`` with ``pattern``, or ``sdpa``/``eager``).

    Used to evaluate a dense-trained model under the sparse pattern (and the reverse) with the same weights.
    """
    import hf_sparsek
    from hf_sparsek.model_defaults import CONFIG_ATTRIBUTE

    if attn not in ATTN_CHOICES:
        raise ValueError(f"attn={attn!r}; supported: {ATTN_CHOICES}")
    previous = model.config._attn_implementation
    previous_pattern = getattr(model.config, CONFIG_ATTRIBUTE, None)
    if attn == "sparsek":
        _set_pattern(model, pattern if pattern is not None else hf_sparsek.model_sparsity(model.config),
                     "--eval-pattern")
    else:
        model.set_attn_implementation(attn)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        setattr(model.config, CONFIG_ATTRIBUTE, previous_pattern)


# --------------------------------------------------------------------------------------------------- training
def _callbacks(log_path: Path, eval_docs: list[list[int]] | None, eval_len: int, eval_steps: int,
               autocast: torch.dtype | None, max_windows: int | None) -> list[Any]:
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


def training_documents(
    args: argparse.Namespace, vocab_size: int, model_path: str
) -> tuple[list[list[int]], list[list[int]] | None]:
    """(training documents, held-out documents or None) as token ids, from --train-data / --eval-data /
    --heldout-docs (the last N training documents, e.g. plays the model is not trained on)."""
    if args.train_data == "synthetic":
        docs = synthetic_documents(args.synthetic_docs, vocab_size, args.seq_len // 4, args.seq_len, seed=args.seed)
    else:
        docs = load_token_documents(args.train_data, model_path)
    eval_docs = load_token_documents(args.eval_data, model_path) if args.eval_data else None
    if args.eval_data is None and args.heldout_docs:
        if args.heldout_docs >= len(docs):
            raise ValueError(f"--heldout-docs {args.heldout_docs} leaves no training documents (have {len(docs)})")
        docs, eval_docs = docs[: -args.heldout_docs], docs[-args.heldout_docs :]
    return docs, eval_docs


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: the metrics summary (also in metrics.json) and the trained model."""

    metrics: dict[str, Any]
    model: torch.nn.Module


def _checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing options under the name this transformers version uses (renamed in 5.2x)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else (
        "gradient_checkpointing")
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def finetune(args: argparse.Namespace) -> FinetuneResult:
    """Run one fine-tune from parsed CLI arguments; returns the metrics summary (also written) and the model."""
    import torch
    from hf_sparsek.scripts.packing import PackedDataset, collate_packed, pack_documents
    from transformers import set_seed

    model_path = resolve_model_path(args.model)  # bad input fails here and in load_model, before the Trainer import
    set_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model = load_model(
        model_path, attn=args.attn, pattern=args.pattern, seq_len=args.seq_len, device=device, dtype=args.dtype,
        attention_dropout_zero=args.attention_dropout_zero, allow_reference=args.allow_reference,
    )
    if args.train_only_pattern:
        params = pattern_parameters(model)
        if not params:
            raise ValueError(
                "--train-only-pattern: this model's sparsity pattern has no trainable parameters (the shipped "
                "patterns — sink, window, block layouts, top-k by score — are all parameter-free), so training "
                "only the pattern would change nothing. Use full fine-tuning or --lora-r"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
    if args.lora_r:
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_targets)

    docs, eval_docs = training_documents(args, _base(model).config.vocab_size, model_path)
    rows = pack_documents(docs, args.seq_len)
    if not rows:
        raise ValueError(f"the training data gives no full row of {args.seq_len} tokens")
    dataset = PackedDataset(rows)

    from transformers import Trainer, TrainingArguments

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "loss_log.jsonl"
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    eval_len = args.eval_seq_len or args.seq_len
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=1.0,
        bf16=args.dtype == "bf16", fp16=args.dtype == "fp16", use_cpu=device == "cpu",
        **_checkpointing_kwargs(args.gradient_checkpointing),
        logging_steps=args.logging_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        save_strategy="steps" if args.save_steps > 0 else "no", report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, seed=args.seed, disable_tqdm=False, ddp_find_unused_parameters=False,
    )
    if args.data_order != "random":
        if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
            raise ValueError("--data-order sequential needs a transformers version with train_sampling_strategy")
        targs.train_sampling_strategy = args.data_order
    eval_steps = args.eval_steps if eval_docs else 0
    callbacks = _callbacks(log_path, eval_docs, eval_len, eval_steps, autocast, args.eval_max_windows)
    trainer = Trainer(
        model=model, args=targs, train_dataset=dataset, data_collator=collate_packed, callbacks=callbacks,
    )
    metrics: dict[str, Any] = {
        "model": args.model, "attn": args.attn, "seq_len": args.seq_len, "dtype": args.dtype,
        "lora_r": args.lora_r, "train_rows": len(rows), "world_size": targs.world_size,
        "sparsek": getattr(_base(model).config, "sparsek", None) if args.attn == "sparsek" else None,
        "eval_seq_len": eval_len if eval_docs else None,
        "backend": check_kernel(_base(model).config, args.dtype, device, True) if args.attn == "sparsek" else None,
    }

    def evaluate(tag: str) -> None:
        metrics[tag] = heldout_nll(trainer.model, eval_docs, eval_len, autocast, args.eval_max_windows)
        print(f"held-out ppl {tag} ({args.attn}): {metrics[tag]['ppl']:.3f}", file=sys.stderr)
        if args.eval_also_attn:
            with attention(_base(trainer.model), args.eval_also_attn, args.eval_pattern or args.pattern):
                other = heldout_nll(trainer.model, eval_docs, eval_len, autocast, args.eval_max_windows)
            metrics[f"{tag}_{args.eval_also_attn}"] = other
            print(f"held-out ppl {tag} ({args.eval_also_attn}): {other['ppl']:.3f}", file=sys.stderr)

    if eval_docs and args.eval_before and not args.resume:
        evaluate("eval_before")
    resume: bool | str | None = None
    if args.resume:
        resume = True if args.resume == "last" else args.resume
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    metrics["train_seconds"] = time.time() - start
    metrics["train_loss"] = result.training_loss
    metrics["steps_this_run"] = result.global_step - callbacks[0].first_step
    metrics["train_tokens_per_second"] = (
        (metrics["steps_this_run"] * args.batch_size * args.grad_accum * targs.world_size * args.seq_len)
        / max(metrics["train_seconds"], 1e-9)
    )
    metrics["losses"] = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    if eval_docs:
        evaluate("eval_after")
    save_final(trainer, out / "final", merge_lora=not args.no_merge)
    if trainer.is_world_process_zero():
        _copy_tokenizer(model_path, out / "final")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.accelerator.wait_for_everyone()
    return FinetuneResult(metrics, trainer.model)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


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


def write_adapter_pattern(model: Any, directory: str | os.PathLike) -> Path | None:
    """Write the sparse pattern a peft model trains under beside its saved adapter: ``sparsek_pattern.json`` plus a
    note in the adapter's README.md. Returns the file, or None for a model without a sparsek pattern (dense).

    peft saves and loads only the adapter config and weights (nothing reaches the base model's config), so the
    pattern travels as this file; ``hf_sparsek.set_pattern(base, <file>)`` restores it, :func:`load_finetuned` too.
    """
    base_config = _base(model).config
    sparsek = getattr(base_config, "sparsek", None)
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


def _copy_tokenizer(model_path: str, final_dir: Path) -> None:
    """Save the base model's tokenizer beside the final weights, when the base has one."""
    from transformers import AutoTokenizer

    if any((Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        AutoTokenizer.from_pretrained(model_path).save_pretrained(final_dir)


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``finetune`` options (shared by the subcommand and ``python -m hf_sparsek.scripts.finetune``)."""
    p.add_argument("--model", required=True, help="local checkpoint dir or offline name (smollm2-135m, gemma3-270m)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--attn", choices=ATTN_CHOICES, default="sparsek", help="sparsek, or sdpa/eager: dense baseline")
    p.add_argument("--pattern", default=None, help="preset name, JSON string or JSON file (default: the model's)")
    p.add_argument("--train-data", default="shakespeare",
                   help="token file (.pt/.json: list of token-id lists), a text source name, or 'synthetic'")
    p.add_argument("--eval-data", default=None, help="held-out token file or text source (default: --heldout-docs)")
    p.add_argument("--heldout-docs", type=non_negative_int, default=0,
                   help="hold out the last N training documents for eval")
    p.add_argument("--synthetic-docs", type=positive_int, default=64)
    p.add_argument("--seq-len", type=positive_int, default=8192, help="training length: documents are packed to it")
    p.add_argument("--eval-seq-len", type=positive_int, default=None, help="evaluation window (default: --seq-len)")
    p.add_argument("--eval-steps", type=non_negative_int, default=0,
                   help="held-out perplexity every N steps (0: only before/after)")
    p.add_argument("--eval-max-windows", type=positive_int, default=None, help="cap on evaluation windows (speed)")
    p.add_argument("--no-eval-before", dest="eval_before", action="store_false")
    p.add_argument("--eval-also-attn", choices=ATTN_CHOICES, default=None,
                   help="before/after, also evaluate with this attention (same weights), e.g. sparsek for a dense run")
    p.add_argument("--eval-pattern", default=None, help="pattern for --eval-also-attn sparsek (default: --pattern)")
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--data-order", choices=("random", "sequential"), default="random",
                   help="row order (sequential: same rows per global batch on any number of GPUs, to compare runs)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--warmup-steps", type=non_negative_int, default=0)
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="mixed-precision compute dtype")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--lora-r", type=non_negative_int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=positive_int, default=32)
    p.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS)
    p.add_argument("--no-merge", action="store_true", help="LoRA: save only the adapter, not the merged model")
    p.add_argument("--train-only-pattern", action="store_true",
                   help="freeze the model and train only the pattern's own parameters (errors: none exist yet)")
    p.add_argument("--attention-dropout-zero", action="store_true", help="set the config's attention_dropout to 0")
    p.add_argument("--logging-steps", type=positive_int, default=1)
    p.add_argument("--save-steps", type=non_negative_int, default=50, help="checkpoint every N steps (0: none)")
    p.add_argument("--save-total-limit", type=positive_int, default=2)
    p.add_argument("--resume", default=None, help="'last' or a checkpoint dir to resume from")
    p.add_argument("--allow-reference", action="store_true",
                   help="on CUDA, train sparse layers with the PyTorch reference where the kernel cannot run them")
    p.add_argument("--cpu", action="store_true", help="train on CPU even where CUDA is available")
    p.add_argument("--seed", type=int, default=0)


def _run(args: argparse.Namespace) -> int:
    metrics = finetune(args).metrics
    keys = ("train_loss", "train_tokens_per_second", "train_seconds")
    print(json.dumps({k: metrics[k] for k in keys} | {
        k: v["ppl"] for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, dict)}, indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Add ``finetune`` to the ``hf-sparsek`` CLI."""
    p = subparsers.add_parser("finetune", help="fine-tune a causal LM with sparse attention (HF Trainer)")
    add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_sparsek.scripts.finetune``: the same options and one-line errors as ``hf-sparsek finetune``."""
    parser = CliParser(prog="python -m hf_sparsek.scripts.finetune", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=_run)
    return run_command(parser.parse_args(argv), parser.prog)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "add_lora", "check_dtype", "check_model_type", "check_seq_len", "finetune", "heldout_nll",
    "load_finetuned", "load_model", "load_token_documents", "main", "register", "synthetic_documents",
]
