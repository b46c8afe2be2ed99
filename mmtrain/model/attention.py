"""Self-attention over packed rows: which implementation runs, and the document mask each one takes.

A packed row holds several samples (documents) end to end; `segment_ids` [B, T] numbers them 1, 2, … per row (0 on
padding) and positions restart at 0 per document. Every implementation lets a token attend only to earlier tokens of
its own document, and padding only to itself:

- `sdpa`: a dense [B, 1, T, T] additive mask. Work and memory grow with T², whatever the documents.
- `flex`: torch's `flex_attention` with a document-causal `BlockMask`: blocks that cross documents are skipped, so
  the work grows with the documents' own lengths. CUDA compiles it (Triton); elsewhere it runs torch's reference math.
- `flash_varlen`: variable-length flash attention over `cu_seqlens` (torch's `varlen_attn`; on a CPU, the same
  boundaries through one causal sdpa call per document, so the path can be checked anywhere).
- `auto`: `flex` for packed stages on CUDA where torch has it, else `sdpa` (unpacked rows hold one document each,
  and sdpa's fused kernels skip their padding already).

Both block-skipping kinds are registered as transformers attention functions (`mmtrain_flex`, `mmtrain_varlen`), so
every HF decoder family runs them through its own attention modules, with GQA; unpacked batches (eval, generation)
fall back to the same kernels with transformers' own masks.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from mmtrain.errors import UserError

CHOICES = ("auto", "sdpa", "flex", "flash_varlen")
HF_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "mmtrain_flex", "flash_varlen": "mmtrain_varlen"}


# ---- choosing ------------------------------------------------------------------------------------------------------
def flex_unavailable() -> str | None:
    """Why torch's flex_attention cannot run here, or None."""
    try:
        # probe only (the import is the test)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (torch >= 2.5 does)"
    return None


def varlen_unavailable(device_type: str) -> str | None:
    """Why variable-length flash attention cannot run on `device_type`, or None (CPUs use the per-document path)."""
    if device_type != "cuda":
        return None
    try:
        # probe only (the import is the test)
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.9 does)"
    return None


def resolve_attention(choice: str, device_type: str, training: bool = True, packed: bool = True) -> str:
    """The implementation a recipe's `attention:` runs on `device_type` (for a packed stage or not); refuses one
    that cannot run, saying why."""
    if choice not in CHOICES:
        raise UserError(f"attention must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "auto":
        return "flex" if packed and device_type == "cuda" and flex_unavailable() is None else "sdpa"
    if choice == "flex":
        reason = flex_unavailable()
        if reason is None and training and device_type != "cuda":
            reason = (f"torch {torch.__version__} runs flex_attention's backward only on CUDA; on {device_type} "
                      "train with attention: sdpa or flash_varlen")
        if reason:
            raise UserError(f"attention: flex cannot run here: {reason}")
    if choice == "flash_varlen":
        reason = varlen_unavailable(device_type)
        if reason:
            raise UserError(f"attention: flash_varlen cannot run here: {reason}")
    return choice


def set_attention(llm: torch.nn.Module, implementation: str) -> None:
    """Point an HF causal LM's attention modules at `implementation`. `sdpa` (dense masks) keeps the implementation
    transformers chose for the family (sdpa, or eager where sdpa cannot do the family's attention, e.g. Gemma-2's
    logit soft-capping); `flex` and `flash_varlen` are mmtrain's registered functions."""
    config = llm.config
    if not hasattr(llm, "dense_attention"):  # transformers' choice for the family, kept for `sdpa`
        own = config._attn_implementation
        if own == "sdpa" and getattr(config, "attn_logit_softcapping", None):
            own = "eager"  # sdpa cannot soft-cap logits; transformers 4.x still picked it for Gemma-2
        llm.dense_attention = own
    name = llm.dense_attention if implementation == "sdpa" else HF_IMPLEMENTATION[implementation]
    if name.startswith("mmtrain_"):
        register_attention_functions()
    config._attn_implementation = name


# ---- masks ---------------------------------------------------------------------------------------------------------
def dense_document_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T] segment ids → [B, 1, T, T] additive mask: 0 where a token may attend (same document, not in the
    future), the dtype's minimum elsewhere. Padding attends only to itself so no row is all-masked (no NaN)."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] > 0)
    allowed |= torch.eye(t, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def document_block_mask(segment_ids: torch.Tensor) -> Any:
    """[B, T] segment ids → a flex_attention `BlockMask` allowing exactly what `dense_document_mask` allows."""
    from torch.nn.attention.flex_attention import create_block_mask  # lazy: flex is one of three choices

    segments = segment_ids.to(torch.int32)
    batch, length = segments.shape

    def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        same = segments[b, q] == segments[b, kv]
        return (same & (q >= kv) & (segments[b, q] > 0)) | (q == kv)

    return create_block_mask(document_causal, batch, None, length, length, device=segment_ids.device)


def cu_seqlens(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of the documents of the rows laid end to end ([B, T] flattened), for varlen kernels: int32
    [n + 1] and the longest document. Each row's padding is one more run (it attends only to itself; no labels)."""
    flat = segment_ids.reshape(-1)
    length = segment_ids.shape[1]
    position = torch.arange(flat.numel(), device=flat.device)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = (flat[1:] != flat[:-1]) | (position[1:] % length == 0)
    bounds = torch.cat([position[starts], position.new_tensor([flat.numel()])]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def packed_attention_inputs(implementation: str, segment_ids: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """What the HF LLM takes for packed rows under `implementation`: its `attention_mask`, plus the varlen kwargs."""
    if implementation == "flex":
        return {"attention_mask": document_block_mask(segment_ids)}
    if implementation == "flash_varlen":
        bounds, longest = cu_seqlens(segment_ids)
        return {"attention_mask": None, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                "max_length_q": longest, "max_length_k": longest}
    return {"attention_mask": dense_document_mask(segment_ids, dtype)}


# ---- the attention functions transformers calls ---------------------------------------------------------------------
_compiled_flex: dict[str, Any] = {}


def _flex_kernel(device_type: str) -> Any:
    """flex_attention compiled once per process on CUDA (its fused Triton kernel); the reference math elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention  # lazy: flex is one of three choices

    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _compiled_flex:
        _compiled_flex["cuda"] = torch.compile(flex_attention)
    return _compiled_flex["cuda"]


def flex_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """[B, H, T, D] q and [B, H_kv, T, D] k/v → [B, T, H, D], attending where `attention_mask` (a BlockMask) allows."""
    from torch.nn.attention.flex_attention import BlockMask  # lazy: flex is one of three choices

    if dropout:
        raise UserError("attention: flex does not apply attention dropout; set the LLM's attention_dropout to 0")
    if not isinstance(attention_mask, BlockMask):
        raise ValueError(f"mmtrain_flex needs a BlockMask, got {type(attention_mask).__name__}")
    check_window(kwargs.get("sliding_window"), query.shape[2])
    kernel = _flex_kernel(query.device.type)
    softcap = kwargs.get("softcap")
    extra = {"score_mod": _softcap_scores(float(softcap))} if softcap else {}
    out = kernel(query, key, value, block_mask=attention_mask, scale=scaling,
                 enable_gqa=query.shape[1] != key.shape[1], **extra)
    return out.transpose(1, 2).contiguous(), None


def _softcap_scores(cap: float) -> Any:
    """Gemma-2-style logit soft-capping (cap · tanh(score / cap)) as a flex score_mod."""

    def softcap(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return cap * torch.tanh(score / cap)

    return softcap


def check_window(sliding_window: int | None, length: int) -> None:
    """Packed rows are masked per document only: refuse rows longer than a sliding-window LLM's window."""
    if sliding_window and length > int(sliding_window):
        raise UserError(f"packed rows of {length} tokens exceed the LLM's sliding_window {sliding_window}, which the "
                        f"document masks do not apply; keep max_length <= {sliding_window}")


def _causal_per_document(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                         scaling: float | None) -> torch.Tensor:
    """[N, H, D] → [N, H, D]: one causal sdpa call per document (the CPU stand-in for the varlen kernel)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[None, start:end].transpose(1, 2) for x in (query, key, value))  # 4-D: sdpa's fused CPU kernel
        pieces.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)[0].transpose(0, 1))
    return torch.cat(pieces)


def _varlen_cuda(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, longest: int,
                 scaling: float | None) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn  # lazy: its import costs ~0.9 s (torch compile machinery)

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if query.shape[1] != key.shape[1]:
        if "enable_gqa" in parameters:
            causal["enable_gqa"] = True
        else:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, bounds, bounds, longest, longest, scale=scaling, **causal)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Packed rows (`cu_seq_lens_q` given): variable-length causal attention per document. Otherwise (unpacked
    batches) transformers' sdpa with the mask it built."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # lazy: unpacked batches only

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    if dropout:
        raise UserError("attention: flash_varlen does not apply attention dropout; set the LLM's attention_dropout to 0")
    if kwargs.get("softcap"):
        raise UserError("attention: flash_varlen cannot apply the LLM's attention logit soft-capping; use flex or sdpa")
    batch, heads, length, dim = query.shape
    check_window(kwargs.get("sliding_window"), length)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], dim) for x in (query, key, value))
    if query.device.type == "cuda":
        out = _varlen_cuda(q, k, v, bounds, int(kwargs["max_length_q"]), scaling)
    else:
        out = _causal_per_document(q, k, v, bounds.tolist(), scaling)
    return out.reshape(batch, length, heads, dim), None


def register_attention_functions() -> None:
    """Make `mmtrain_flex` and `mmtrain_varlen` known to transformers (attention and mask interfaces)."""
    # lazy: registration runs once, when a model first asks for flex or varlen
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("mmtrain_flex", flex_attention_forward)
    AttentionInterface.register("mmtrain_varlen", varlen_attention_forward)
    AttentionMaskInterface.register("mmtrain_flex", ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"])
    AttentionMaskInterface.register("mmtrain_varlen", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
