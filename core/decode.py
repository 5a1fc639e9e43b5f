"""Decoding speed on CPU: how the language model's weights lie in memory, and a compiled decode step.

One decode step multiplies one row of activations by every weight matrix of the language model, so
it is a read of all those weights: memory bandwidth sets the limit (`python -m bench.engine`, (c)).
How close a step gets depends on the kernel reading them. Measured on the 2-core AMD EPYC these
machines have (MKL 2024.2 inside torch 2.14.1, SmolVLM-256M's shapes, one thread):

- as loaded, `[out, in]`: MKL's matrix-vector product reads ~15 GB/s, and uses one thread whatever
  torch is given (24 tokens/s);
- input-major, the same values and shapes stored as the transpose of an `[in, out]` array: MKL
  streams those rows at ~22-28 GB/s (29 tokens/s, 1.2x). Prompt encoding (many rows) is unchanged;
- compiled: the decoder's and the head's one-token steps through `torch.compile` (inductor,
  max-autotune, frozen weights): inductor packs each weight once and runs its own C++ GEMM kernel,
  fused with the small ops around it (48 tokens/s, 2x), and batched steps read the packed weights
  once for all rows. It costs a compile for one row and again for a batch (~1 min each on 2 cores, at
  every start: frozen graphs are not kept in inductor's disk cache, and after every adapter added),
  packed copies of the weights, and a C++ compiler. `Engine.warm_up` compiles before the first question.

`Settings.cpu_decode` picks one (input-major by default); GPUs are left as loaded (cuBLAS reads both
layouts at full speed; CUDA graphs are the GPU's answer to per-token overhead, docs/serving.md).

    tune_for_cpu(model, "compiled")   # idempotent; call again after adding adapters
"""

from __future__ import annotations

import logging
from typing import Any

import torch

MODES = ("as-loaded", "input-major", "compiled")
log = logging.getLogger("dermaloop.core")


def _head(model: Any) -> Any | None:
    """The output head, unless it is the input embeddings (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision tie them):
    re-laid, token lookups would read strided rows; compiled, a frozen copy would double it."""
    head = model.get_output_embeddings()
    tied = {id(p) for p in model.get_input_embeddings().parameters()}
    return None if head is None or any(id(p) in tied for p in head.parameters()) else head


def _decode_linears(model: Any) -> list[torch.nn.Linear]:
    """The linear layers one decode step reads: the language model's and the output head's, not the
    vision tower's (it runs once per image, compute-bound)."""
    head = _head(model)
    modules = [*model.get_decoder().modules(), *(head.modules() if head is not None else ())]
    return [m for m in modules if isinstance(m, torch.nn.Linear) and m.weight.dtype.is_floating_point]


def _input_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.t().is_contiguous() and not weight.is_contiguous()


@torch.no_grad()
def set_layout(model: Any, input_major: bool) -> int:
    """Store the decode weights input-major (or back as loaded); returns how many were moved. The values
    are unchanged: `weight` is still `[out, in]`, a view of an `[in, out]` array."""
    moved = 0
    for linear in _decode_linears(model):
        w = linear.weight
        if input_major and not _input_major(w):
            w.data = w.data.t().contiguous().t()
        elif not input_major and _input_major(w):
            w.data = w.data.contiguous()
        else:
            continue
        moved += 1
    return moved


def _one_token_compiled(module: Any) -> None:
    """Route `module`'s one-token calls (no gradients) through `torch.compile`; longer inputs stay eager."""
    if getattr(module, "_dermaloop_eager_forward", None) is not None:
        return
    eager = module.forward
    # fullgraph: one graph per call, so no resumed frame (a layer's forward, shared by every layer) can run
    # with another module's weights, and a failure happens before any side effect on the KV cache.
    compiled = torch.compile(eager, dynamic=True, fullgraph=True, options={"max_autotune": True})
    failed = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids", args[0] if args else None) if x is None else x
        # One token per row, contiguous: decode steps (a batch's last prompt positions, a strided slice,
        # would compile another graph for one call per answer).
        if not failed and x is not None and x.shape[1] == 1 and x.is_contiguous() and torch.is_inference_mode_enabled():
            try:
                # Frozen weights (constants inductor packs). Dynamo reads the flag when it traces, so it is
                # set around the call: `options={"freezing": True}` alone compiled MKL calls.
                with torch._inductor.config.patch(freezing=True):
                    return compiled(*args, **kwargs)
            except Exception as e:  # no C++ compiler, a family that breaks the graph: slower, never a failed answer
                failed = True
                log.warning("cpu_decode compiled: compiling failed (%s); decoding eagerly from now on", str(e).splitlines()[0][:200])
        return eager(*args, **kwargs)

    module._dermaloop_eager_forward = eager
    module.forward = forward


def _eager(module: Any) -> None:
    # Gone from the instance, not replaced: peft deep-copies the head for an adapter's own (modules_to_save),
    # and a copied instance attribute would still run the original head.
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_dermaloop_eager_forward", None)


def _compiled_modules(model: Any) -> list[Any]:
    head = _head(model)
    return [model.get_decoder(), *([head] if head is not None else [])]


def compile_decode(model: Any) -> None:
    """Compile the decoder's and the head's one-token steps; prompts and training stay eager. Shapes are
    dynamic (one compile serves every conversation length); batch size 1 and larger batches compile once
    each, per thread count and model version."""
    for module in _compiled_modules(model):
        _one_token_compiled(module)


def uncompile_decode(model: Any) -> None:
    """Back to eager; call before peft adds an adapter (it copies the head with what is on it)."""
    compiled = [m for m in _compiled_modules(model) if "_dermaloop_eager_forward" in m.__dict__]
    for module in compiled:
        _eager(module)
    if compiled:
        # Drop the compiled graphs and their packed weights: kept, every promotion would add a set, and
        # dynamo's recompile limit per function would end in silent eager decoding after a few versions.
        torch._dynamo.reset()


def tune_for_cpu(model: Any, mode: str) -> None:
    """Apply `mode` (one of MODES) to a model on the CPU; a model elsewhere is left as it is."""
    if mode not in MODES:
        raise ValueError(f"cpu_decode must be one of {', '.join(MODES)}, not {mode!r}")
    if model.device.type != "cpu":
        return
    set_layout(model, mode != "as-loaded")
    if mode == "compiled":
        compile_decode(model)
    else:
        uncompile_decode(model)
