"""CUDA checks of the transformers face that CPU tests cannot make (one device call, JSON to $OUT).

    python -m scripts.gpu_face_checks [--out DIR]

A random-weight Llama (bf16, head dim 64, GQA) with a sparse pattern, Triton backend: generate() with the dynamic,
static and offloaded caches (same tokens), the sparse model against sdpa with the pattern's exact token mask,
torch.compile(model, fullgraph=True) against eager (prefill, padded prefill, static-cache generate), a
text-generation pipeline with model_kwargs, a top-k pattern's kept key tile features against recomputing them
(greedy and beam search), a top-k pattern under transformers' automatic compile of static-cache decoding against
eager, and whether the Gluon kernels are allowed on this Triton. Every check is recorded with its
error; a failure never ends the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch._dynamo
import transformers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

import hf_sparsek
from hf_sparsek import SparsePattern

PATTERN = SparsePattern(block_size=64, sink_tokens=16, window=128)
TOPK = SparsePattern(block_size=64, sink_tokens=16, window=128, topk_blocks=2, selector="mass")
VOCAB = 512


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         attention_dropout=0.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.cuda().eval()


@contextmanager
def exact_fp32(model: torch.nn.Module) -> Iterator[None]:
    """The model in fp32 without TF32 inside, bf16 again after: greedy tokens then compare exactly (bf16 random
    weights leave near-ties that any reordering of a sum flips)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model.float()
    try:
        yield
    finally:
        model.to(torch.bfloat16)


def tiny_gemma3(impl: str) -> torch.nn.Module:
    """Gemma 3 270M's attention shape (4 / 1 heads, head dim 256, window 512, five sliding layers then a full one)
    at a tenth of its width, random fp32 weights: "sparsek" takes the shipped gemma3_text default."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                              query_pre_attn_scalar=256, max_position_embeddings=4096, attention_dropout=0.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    return model.cuda().eval()


def compile_counts() -> tuple[int, int]:
    """(CUDA graphs inductor skipped, graphs Dynamo traced) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"]


def check(results: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    start = time.perf_counter()
    try:
        out = fn()
        results[name] = {"ok": bool(out.pop("ok", True)), **out}
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                         "trace": traceback.format_exc()[-3000:]}
    results[name]["seconds"] = round(time.perf_counter() - start, 2)
    print(name, results[name].get("ok"), {k: v for k, v in results[name].items() if k not in ("trace",)}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from hf_sparsek.kernels import gluon_support

    results: dict[str, Any] = {
        "env": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "transformers": transformers.__version__, "triton": __import__("triton").__version__,
                "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    check(results, "gluon_allowed_on_this_triton", lambda: {"ok": gluon_support.allowed()})
    model = tiny_llama()
    hf_sparsek.set_pattern(model, PATTERN)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 700), device="cuda", generator=gen)

    def exact_mask() -> dict[str, Any]:
        with torch.no_grad():
            sparse = model(ids).logits.float()
            mask4d = hf_sparsek.exact_token_mask(PATTERN, ids.shape[1])[:, :1].cuda()
            model.set_attn_implementation("sdpa")
            dense = model(ids, attention_mask=mask4d.expand(2, -1, -1, -1)).logits.float()
            hf_sparsek.set_pattern(model, PATTERN)
        err = ((sparse - dense).norm() / dense.norm()).item()
        return {"ok": err < 2e-2, "rel_err_vs_sdpa_exact_mask": err}

    def static_vs_dynamic() -> dict[str, Any]:
        """fp32 without TF32 and without transformers' automatic compile of static-cache decoding, so that greedy
        tokens compare exactly (bf16 random weights leave near-ties that any reordering flips)."""
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, disable_compile=True)
        with exact_fp32(model):
            dyn = model.generate(ids, **kw)
            sta = model.generate(ids, cache_implementation="static", **kw)
        return {"ok": torch.equal(dyn, sta), "same_tokens": int((dyn == sta).sum()), "of": dyn.numel()}

    def static_auto_compile() -> dict[str, Any]:
        """transformers compiles static-cache decoding by itself on CUDA (CUDA graphs where it can): it must run and
        give the eager tokens (fp32, no TF32)."""
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, cache_implementation="static")
        with exact_fp32(model):
            eager = model.generate(ids, disable_compile=True, **kw)
            torch._dynamo.reset()  # trace afresh: the graphs counted are this generate()'s
            skips, graphs = compile_counts()
            auto = model.generate(ids, **kw)
        # the decode ops are CUDA-graph safe (hf_sparsek::decode_attend, decode_select): inductor should skip no graph
        # for them, and the forward is traced once for all decode steps
        skips, graphs = (now - then for now, then in zip(compile_counts(), (skips, graphs), strict=True))
        return {"ok": torch.equal(eager, auto) and graphs == 1, "same_tokens": int((eager == auto).sum()),
                "of": eager.numel(), "cudagraph_skips": skips, "graphs_traced": graphs}

    def compiled_fullgraph() -> dict[str, Any]:
        compiled = torch.compile(model, fullgraph=True)
        mask = torch.ones_like(ids)
        mask[0, :37] = 0
        out = {}
        with torch.no_grad():
            for name, kwargs in (("prefill", {}), ("padded", {"attention_mask": mask})):
                eager = model(ids, **kwargs).logits.float()
                comp = compiled(ids, **kwargs).logits.float()
                keep = slice(None) if name == "prefill" else (slice(None), slice(37, None))
                out[name] = ((comp[keep] - eager[keep]).norm() / eager[keep].norm()).item()
        out["ok"] = all(v < 2e-2 for v in out.values())
        return out

    def compiled_static_generate() -> dict[str, Any]:
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static",
                  disable_compile=True)  # our own fullgraph compile below, not transformers' CUDA-graph one
        with exact_fp32(model):
            eager = model.generate(ids, **kw)
            model.forward = torch.compile(model.forward, fullgraph=True)
            try:
                comp = model.generate(ids, **kw)
            finally:
                del model.forward
        return {"ok": torch.equal(eager, comp), "same_tokens": int((eager == comp).sum()), "of": eager.numel()}

    def offloaded_caches() -> dict[str, Any]:
        """The offloaded caches (CUDA only: CPU tests cannot run them) give the dynamic cache's tokens (fp32)."""
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, disable_compile=True)
        out: dict[str, Any] = {}
        with exact_fp32(model):
            dyn = model.generate(ids, **kw)
            for impl in ("offloaded", "offloaded_static"):
                got = model.generate(ids, cache_implementation=impl, **kw)
                out[impl] = int((got == dyn).sum())
        out["of"] = dyn.numel()
        out["ok"] = all(out[impl] == dyn.numel() for impl in ("offloaded", "offloaded_static"))
        return out

    def topk_store_generate() -> dict[str, Any]:
        """A top-k "mass" pattern keeps key tile features per layer (the Triton store, checked on the device):
        greedy and 3-beam generate() give the tokens and logits of recomputing them from all keys each step."""
        from hf_sparsek.selection import store as store_module

        real = store_module.selection_state_for
        out: dict[str, Any] = {}
        hf_sparsek.set_pattern(model, TOPK)
        try:
            with exact_fp32(model):
                for name, extra in (("greedy", {}), ("beams3", {"num_beams": 3})):
                    kw = dict(max_new_tokens=80, do_sample=False, pad_token_id=0, disable_compile=True,
                              output_logits=True, return_dict_in_generate=True, **extra)
                    kept = model.generate(ids, **kw)
                    store_module.selection_state_for = lambda module, pattern: None
                    try:
                        fresh = model.generate(ids, **kw)
                    finally:
                        store_module.selection_state_for = real
                    diff = (torch.stack(kept.logits) - torch.stack(fresh.logits)).abs().max().item()
                    out[name] = {"same_tokens": bool(torch.equal(kept.sequences, fresh.sequences)),
                                 "max_logit_diff": diff}
        finally:
            hf_sparsek.set_pattern(model, PATTERN)
        out["ok"] = all(v["same_tokens"] and v["max_logit_diff"] == 0.0 for v in out.values())
        return out

    def topk_static_auto_compile() -> dict[str, Any]:
        """transformers' automatic compile of static-cache decoding with a top-k pattern: runs and gives the eager
        tokens (fp32, no TF32), traced once. Its op builds the index on the host, so inductor keeps it outside CUDA
        graphs: the skips are recorded, not required to be zero."""
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, cache_implementation="static")
        hf_sparsek.set_pattern(model, TOPK)
        try:
            with exact_fp32(model):
                eager = model.generate(ids, disable_compile=True, **kw)
                torch._dynamo.reset()  # trace afresh: the graphs counted are this generate()'s
                skips, graphs = compile_counts()
                auto = model.generate(ids, **kw)
        finally:
            hf_sparsek.set_pattern(model, PATTERN)
        skips, graphs = (now - then for now, then in zip(compile_counts(), (skips, graphs), strict=True))
        return {"ok": torch.equal(eager, auto) and graphs == 1, "same_tokens": int((eager == auto).sum()),
                "of": eager.numel(), "cudagraph_skips": skips, "graphs_traced": graphs}

    def gemma3_default_static_auto_compile() -> dict[str, Any]:
        """Gemma 3's shipped default (per-query-head probe, dense tail, rows below 1984 dense) under transformers'
        automatic compile of static-cache decoding, a 1,980-token prompt whose decode steps cross 1984: the
        uncompiled run's tokens, and at most one graph more than sdpa (the step that crosses 1984 traces anew; a
        symbolic offset read as an int traced one per step before aa0e56e: 24 here)."""
        prompt = torch.randint(1, VOCAB, (1, 1980), device="cuda", generator=gen)
        kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, cache_implementation="static")
        out: dict[str, Any] = {}
        for impl in ("sdpa", "sparsek"):
            gemma = tiny_gemma3(impl)
            eager = gemma.generate(prompt, disable_compile=True, **kw)
            torch._dynamo.reset()
            _, graphs = compile_counts()
            auto = gemma.generate(prompt, **kw)
            out[impl] = {"same_tokens": int((eager == auto).sum()), "of": eager.numel(),
                         "graphs_traced": compile_counts()[1] - graphs}
            del gemma
        from hf_sparsek.model_defaults import layer_pattern

        full = layer_pattern(tiny_gemma3("sparsek").config, 5)  # the full-attention layer
        out["full_layer_pattern"] = {"selector": full.selector, "per_query_head": full.per_query_head,
                                     "dense_tail": full.dense_tail, "min_sparse_len": full.min_sparse_len}
        out["ok"] = (out["sparsek"]["same_tokens"] == out["sparsek"]["of"]
                     and out["sparsek"]["graphs_traced"] <= out["sdpa"]["graphs_traced"] + 1)
        return out

    def pipeline_model_kwargs() -> dict[str, Any]:
        import tempfile

        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, pipeline

        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        text = " ".join(f"w{i}" for i in ids[0, :300].tolist())
        out = {}
        with tempfile.TemporaryDirectory() as folder:
            PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                                    eos_token="w1").save_pretrained(folder)
            model.save_pretrained(folder)
            for impl in ("sdpa", "sparsek"):
                pipe = pipeline("text-generation", model=folder, device=0,
                                model_kwargs={"attn_implementation": impl, "dtype": torch.bfloat16})
                out[impl] = pipe(text, max_new_tokens=8, do_sample=False)[0]["generated_text"]
                out[f"{impl}_attn_implementation"] = pipe.model.config._attn_implementation
        return {"ok": out["sparsek_attn_implementation"] == "sparsek" and len(out["sparsek"]) > len(text),
                "new_words_sparsek": out["sparsek"][len(text):], "new_words_sdpa": out["sdpa"][len(text):]}

    for name, fn in (("sparse_equals_sdpa_with_exact_mask", exact_mask),
                     ("generate_static_equals_dynamic", static_vs_dynamic),
                     ("generate_static_with_transformers_auto_compile", static_auto_compile),
                     ("compile_fullgraph_equals_eager", compiled_fullgraph),
                     ("compile_fullgraph_static_generate", compiled_static_generate),
                     ("generate_offloaded_caches_equal_dynamic", offloaded_caches),
                     ("generate_topk_store_equals_recomputing", topk_store_generate),
                     ("generate_topk_static_with_transformers_auto_compile", topk_static_auto_compile),
                     ("gemma3_default_static_auto_compile", gemma3_default_static_auto_compile),
                     ("pipeline_model_kwargs", pipeline_model_kwargs)):
        check(results, name, fn)
    from scripts.common import write_json

    write_json(os.path.join(args.out, "face_checks.json"), {"command": "python -m scripts.gpu_face_checks", **results})
    print(json.dumps({k: v.get("ok") for k, v in results.items() if k != "env"}, indent=1))


if __name__ == "__main__":
    main()
