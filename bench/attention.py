"""Attention on packed rows, side by side in one run: the dense-mask sdpa path against the two block-skipping paths.

- dense: `F.scaled_dot_product_attention` with `dense_document_mask` (a [B, 1, T, T] additive mask: work and
  memory grow with T², whatever the documents)
- flex: `flex_attention` with `document_block_mask` (blocks that cross documents are skipped), compiled (on CUDA
  through `mmtrain.model.attention._flex_kernel`, i.e. `flex_attention_forward` as the model calls it)
- varlen: `varlen_attention_forward` over `cu_seqlens` (torch's `varlen_attn` on CUDA; one causal sdpa call per
  document on a CPU)

for packed rows of 2,048 and 8,192 tokens (batch 1) holding 1, 4 and 16 equal-length documents. CUDA: the LLaMA-7B
attention shape (32 query heads, 32 kv heads, head dim 128, bf16), forward + backward. CPU: a smaller fp32 shape
(4 heads, head dim 64, printed) on one intra-op thread unless --threads says otherwise, forward only for every column,
since torch runs flex_attention's backward only on CUDA (CPU varlen is the per-document stand-in). Each case reports
the median time over a few repetitions after warm-up (the three implementations take turns), the peak memory above the
inputs (CUDA only) and the speed-up of flex and varlen over dense. Before anything is timed, every case checks that
flex's and varlen's outputs (and on CUDA their q/k/v gradients) equal dense's within the dtype's tolerance; a mismatch
stops the bench. Masks and boundaries are built once per case outside the timed calls (once per batch, shared by every
layer, in a model).

    python bench/attention.py [--device cpu|cuda] [--quick] [--json PATH] [--repetitions N] [--threads N]

`--quick` runs 256- and 512-token rows (seconds on a CPU, plus compilation).
Target (GPU): flex >= 1.4 x dense at 8,192 tokens, 16 documents.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmtrain.model.attention import (_flex_kernel, cu_seqlens, dense_document_mask,  # noqa: E402
                                     document_block_mask, flex_attention_forward, flex_unavailable,
                                     varlen_attention_forward, varlen_unavailable)

IMPLEMENTATIONS = ("dense", "flex", "varlen")
LENGTHS, QUICK_LENGTHS = (2048, 8192), (256, 512)
DOCUMENTS = (1, 4, 16)
TARGET_SPEEDUP, TARGET_TOKENS, TARGET_DOCUMENTS = 1.4, 8192, 16
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
"""(atol, rtol) per dtype: a check passes when max |x - dense| <= atol + rtol * max |dense|."""


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str


CUDA_SHAPE = Shape(heads=32, kv_heads=32, head_dim=128, dtype="bfloat16")
CPU_SHAPE = Shape(heads=4, kv_heads=4, head_dim=64, dtype="float32")

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- the three implementations ------------------------------------------------------------------------------------
def cpu_flex_kernel(tokens: int, shape: Shape) -> tuple[Any, str]:
    """flex_attention compiled for the CPU (forward only; `_flex_kernel` gives the reference math off CUDA), tried
    once on the first case's shape (so the bench reuses that compilation)."""
    from torch.nn.attention.flex_attention import flex_attention

    try:
        kernel = torch.compile(flex_attention, dynamic=False)
        q, k, v = (torch.zeros(1, heads, tokens, shape.head_dim)  # three buffers: torch 2.11 refuses one shared
                   for heads in (shape.heads, shape.kv_heads, shape.kv_heads))
        with torch.no_grad():
            kernel(q, k, v, block_mask=document_block_mask(torch.ones(1, tokens, dtype=torch.long)),
                   enable_gqa=shape.heads != shape.kv_heads)
        return kernel, "torch.compile'd flex_attention (CPU)"
    except Exception as error:  # no C++ toolchain, or an inductor limitation: say so and time the reference math
        first = (str(error).strip().splitlines() or [""])[0][:160]
        reason = f"{type(error).__name__}: {first}"
        return _flex_kernel("cpu"), f"eager flex_attention reference math (compile failed: {reason})"


def build_kernels(segment_ids: torch.Tensor, dtype: torch.dtype, heads: int, kv_heads: int,
                  cpu_flex: Any, skipped: dict[str, str]) -> dict[str, Kernel]:
    """The implementations for one case, each [B, H, T, D] q and [B, H_kv, T, D] k/v → [B, T, H, D] (the layout the
    model's attention functions return); masks and boundaries built here, outside the timed calls."""
    mask = dense_document_mask(segment_ids, dtype)
    gqa = {"enable_gqa": True} if heads != kv_heads else {}
    kernels: dict[str, Kernel] = {
        "dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        .transpose(1, 2).contiguous()}
    if "flex" not in skipped:
        block_mask = document_block_mask(segment_ids)
        if segment_ids.device.type == "cuda":
            kernels["flex"] = lambda q, k, v: flex_attention_forward(None, q, k, v, block_mask)[0]
        else:
            kernels["flex"] = lambda q, k, v: cpu_flex(q, k, v, block_mask=block_mask,
                                                       enable_gqa=heads != kv_heads).transpose(1, 2).contiguous()
    if "varlen" not in skipped:
        bounds, longest = cu_seqlens(segment_ids)
        kernels["varlen"] = lambda q, k, v: varlen_attention_forward(
            None, q, k, v, None, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest,
            max_length_k=longest)[0]
    return kernels


def packed_segments(tokens: int, documents: int, device: torch.device) -> torch.Tensor:
    """[1, tokens] segment ids: `documents` equal-length documents numbered 1, 2, …, no padding."""
    return (torch.arange(tokens, device=device) // (tokens // documents) + 1)[None]


# ---- one step, checks, timing -------------------------------------------------------------------------------------
def step(kernel: Kernel, inputs: Inputs, grad_out: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The output, plus the q/k/v gradients when `grad_out` is given (forward + backward)."""
    if grad_out is None:
        with torch.no_grad():
            return (kernel(*inputs),)
    out = kernel(*inputs)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(kernels: dict[str, Kernel], inputs: Inputs, grad_out: torch.Tensor | None, dtype: torch.dtype,
          skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each non-dense implementation's max |difference| from dense (output and, with backward, q/k/v gradients).
    One that raises here cannot run (a missing kernel, a refused shape): it is dropped and `skipped` says why."""
    atol, rtol = TOLERANCE[dtype]
    reference = step(kernels["dense"], inputs, grad_out)
    checks = {}
    for name in [n for n in kernels if n != "dense"]:
        try:
            got = step(kernels[name], inputs, grad_out)
        except Exception as error:
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            print(f"  {name}: SKIPPED from here on: {skipped[name]}")
            del kernels[name]
            continue
        diffs = [float((g.float() - r.float()).abs().max()) for g, r in zip(got, reference)]
        bounds = [atol + rtol * float(r.float().abs().max()) for r in reference]
        checks[name] = {"output_max_abs_diff": diffs[0], "output_tolerance": bounds[0],
                        "grad_max_abs_diff": max(diffs[1:]) if len(diffs) > 1 else None,
                        "grad_tolerance": min(bounds[1:]) if len(bounds) > 1 else None,
                        "passed": all(d <= b for d, b in zip(diffs, bounds))}
    return checks


def timed(kernel: Kernel, inputs: Inputs, grad_out: torch.Tensor | None, device: torch.device) -> float:
    """Milliseconds of one step (CUDA: events around it, then synchronize)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(kernel, inputs, grad_out)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    begin = time.perf_counter()
    step(kernel, inputs, grad_out)
    return (time.perf_counter() - begin) * 1e3


def peak_mib(kernel: Kernel, inputs: Inputs, grad_out: torch.Tensor | None, device: torch.device) -> float | None:
    """CUDA: peak bytes allocated during one step above what was allocated before it (inputs, masks), in MiB."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(kernel, inputs, grad_out)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_case(tokens: int, documents: int, shape: Shape, device: torch.device, backward: bool, warmup: int,
             repetitions: int, cpu_flex: Any, skipped: dict[str, str]) -> dict[str, Any]:
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator(device=device).manual_seed(tokens * 100 + documents)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(1, heads, tokens, shape.head_dim, generator=gen, device=device, dtype=dtype)

    inputs = (randn(shape.heads), randn(shape.kv_heads), randn(shape.kv_heads))
    for tensor in inputs:
        tensor.requires_grad_(backward)
    grad_out = (torch.randn(1, tokens, shape.heads, shape.head_dim, generator=gen, device=device, dtype=dtype)
                if backward else None)
    segment_ids = packed_segments(tokens, documents, device)
    kernels = build_kernels(segment_ids, dtype, shape.heads, shape.kv_heads, cpu_flex, skipped)
    checks = check(kernels, inputs, grad_out, dtype, skipped)
    for name, result in checks.items():
        grads = "" if result["grad_max_abs_diff"] is None else f", grads {result['grad_max_abs_diff']:.2e}"
        print(f"  check {tokens:>6,} tokens, {documents:>2} documents: {name:<6} = dense: max |diff| "
              f"output {result['output_max_abs_diff']:.2e}{grads} -> {'ok' if result['passed'] else 'FAILED'}")
        if not result["passed"]:
            raise SystemExit(f"{name} does not match dense at {tokens} tokens, {documents} documents: {result}; "
                             "refusing to time a wrong kernel")
    for _ in range(warmup):
        for kernel in kernels.values():
            step(kernel, inputs, grad_out)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repetitions):  # the implementations take turns, so drift hits them alike
        for name, kernel in kernels.items():
            times[name].append(timed(kernel, inputs, grad_out, device))
    results: dict[str, Any] = {}
    for name in IMPLEMENTATIONS:
        if name not in kernels:
            results[name] = {"skipped": skipped[name]}
            continue
        results[name] = {"median_ms": statistics.median(times[name]), "times_ms": times[name],
                         "peak_mib": peak_mib(kernels[name], inputs, grad_out, device)}
    for name in kernels:
        results[name]["speedup_vs_dense"] = results["dense"]["median_ms"] / results[name]["median_ms"]
    mask_mib = segment_ids.shape[0] * tokens * tokens * torch.finfo(dtype).bits / 8 / 2**20
    return {"tokens": tokens, "documents": documents, "document_length": tokens // documents,
            "dense_mask_mib": mask_mib, "results": results, "checks": checks}


# ---- report ---------------------------------------------------------------------------------------------------------
COLUMNS = (("dense", "median_ms", "dense ms", ".2f"), ("flex", "median_ms", "flex ms", ".2f"),
           ("varlen", "median_ms", "varlen ms", ".2f"), ("flex", "speedup_vs_dense", "flex x", ".2f"),
           ("varlen", "speedup_vs_dense", "varlen x", ".2f"), ("dense", "peak_mib", "dense MiB", ".1f"),
           ("flex", "peak_mib", "flex MiB", ".1f"), ("varlen", "peak_mib", "varlen MiB", ".1f"))
"""The table's columns: (implementation, result key, heading, format); groups of 3, 2 and 3 between bars."""


def print_table(cases: list[dict[str, Any]]) -> None:
    def row(first: str, cells: list[str], last: str) -> str:
        cells = [f"{c:>10}" for c in cells]
        return f"{first} | {' '.join(cells[:3])} | {' '.join(cells[3:5])} | {' '.join(cells[5:])} | {last}"

    head = row(f"{'tokens':>7} {'docs':>4}", [c[2] for c in COLUMNS], f"{'mask MiB':>8}")
    print(head)
    print("-" * len(head))
    for case in cases:
        cells = []
        for impl, key, _, spec in COLUMNS:
            result = case["results"][impl]
            value = result.get(key)
            cells.append("skipped" if "skipped" in result else "n/a" if value is None else format(value, spec))
        print(row(f"{case['tokens']:>7,} {case['documents']:>4}", cells, f"{case['dense_mask_mib']:>8.1f}"))


def target(cases: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """flex's speed-up over dense at the target case (or, with --quick, at the longest row with 16 documents)."""
    tokens = max(c["tokens"] for c in cases)
    case = next(c for c in cases if c["tokens"] == tokens and c["documents"] == TARGET_DOCUMENTS)
    measured = case["results"]["flex"].get("speedup_vs_dense")
    judged = device.type == "cuda" and tokens == TARGET_TOKENS and measured is not None
    return {"required": TARGET_SPEEDUP, "tokens": tokens, "documents": TARGET_DOCUMENTS, "measured": measured,
            "passed": measured >= TARGET_SPEEDUP if judged else None}


def target_line(result: dict[str, Any], device: torch.device) -> str:
    line = (f"target (GPU): flex ≥ {TARGET_SPEEDUP} × dense at {TARGET_TOKENS:,} tokens, "
            f"{TARGET_DOCUMENTS} documents: ")
    if result["measured"] is None:
        return line + "not measured (flex skipped)"
    measured = f"{result['measured']:.2f} ×"
    if result["passed"] is not None:
        return line + f"{'PASS' if result['passed'] else 'FAIL'} ({measured})"
    where = f"at {result['tokens']:,} tokens, " if result["tokens"] != TARGET_TOKENS else ""
    mode = "forward only, " if device.type != "cuda" else ""
    return line + f"measured {measured} {where}on {device.type} ({mode}target is for GPU)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="256- and 512-token rows, few repetitions")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--repetitions", type=int, help="timed steps per implementation and case")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (CPU default 1: on a shared machine more "
                        "threads make small ops' times swing tenfold with other processes' load)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    shape = CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    backward = device.type == "cuda"
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    warmup = 1 if args.quick or device.type == "cpu" else 3
    repetitions = args.repetitions or (3 if args.quick or device.type == "cpu" else 10)
    skipped = {name: reason for name, reason in (("flex", flex_unavailable()),
                                                 ("varlen", varlen_unavailable(device.type))) if reason}
    cpu_flex, flex_kind = (None, "compiled flex_attention via _flex_kernel (Triton)")
    if device.type == "cpu" and "flex" not in skipped:
        cpu_flex, flex_kind = cpu_flex_kernel(lengths[0], shape)
    varlen_kind = "torch varlen_attn" if device.type == "cuda" else "one causal sdpa call per document"

    threads = torch.get_num_threads()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu, {threads} intra-op thread{'' if threads == 1 else 's'}")
    print(f"attention on packed rows: {name}, torch {torch.__version__}")
    print(f"shape: batch 1, {shape.heads} query heads, {shape.kv_heads} kv heads, head dim {shape.head_dim}, "
          f"{shape.dtype}")
    print("timed: forward + backward" if backward else
          "timed: FORWARD ONLY for every column (torch runs flex_attention's backward only on CUDA)")
    print(f"median of {repetitions} after {warmup} warm-up, implementations in turn; flex: {flex_kind}; "
          f"varlen: {varlen_kind}")
    for impl, reason in skipped.items():
        print(f"{impl}: SKIPPED: {reason}")
    print(f"memory: {'peak allocated during one step above the inputs and masks' if backward else 'n/a on CPU'}")

    started = time.perf_counter()
    cases = [run_case(tokens, documents, shape, device, backward, warmup, repetitions, cpu_flex, skipped)
             for tokens in lengths for documents in DOCUMENTS]
    print()
    print_table(cases)
    print(f"(x: speed-up over dense; mask MiB: the dense mask itself, built once per batch and read by every layer; "
          f"{time.perf_counter() - started:.0f} s)")
    goal = target(cases, device)
    print(target_line(goal, device))
    if args.json:
        report = {"device": device.type, "device_name": name, "torch": torch.__version__, "quick": args.quick,
                  "timed": "forward+backward" if backward else "forward", "shape": asdict(shape),
                  "warmup": warmup, "repetitions": repetitions, "flex_kernel": flex_kind,
                  "varlen_kernel": varlen_kind, "skipped": skipped,
                  "tolerance": dict(zip(("atol", "rtol"), TOLERANCE[getattr(torch, shape.dtype)])),
                  "cases": cases, "target": goal}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
