"""GPU (Triton) kernels for expert matmuls over a routing plan's sorted indices. Tensors in, tensors out.

    y = scattered_experts(x, weight, sorted_rows_in, expert_ends, sorted_rows_out,
                          grouped_in=..., grouped_out=..., gates=None, out_rows=None)

Inputs (all on one device; nothing is read back to the host):
  x               [M, in]      activations, fp32 / bf16 / fp16 (weight has the same dtype)
  weight          [E, out, in] expert e computes `row @ weight[e].T` (F.linear's layout)
  expert_ends     [E] int      end of expert e's rows in the grouped order (cumulative counts; E experts,
                               L = expert_ends[-1] grouped rows). Empty experts are fine.
  sorted_rows_in  [L] int      grouped row i reads x[sorted_rows_in[i]] (ignored, may be None, if grouped_in)
  sorted_rows_out [L] int      grouped row i writes y[sorted_rows_out[i]] (ignored, may be None, if grouped_out)
  gates           [L] float    optional, grouped order: row i's product is multiplied by gates[i]
  out_rows        int          optional: reduce. y has out_rows rows and y[t] sums every row i with
                               sorted_rows_out[i] == t; each t must receive exactly L / out_rows rows.

For every grouped row i, with e the expert whose range holds i:
  p_i = (x[i] if grouped_in else x[sorted_rows_in[i]]) @ weight[e].T, times gates[i] if given
  grouped_out:         y [L, out],        y[i] = p_i
  scattered (no out_rows): y [L, out],    y[sorted_rows_out[i]] = p_i   (sorted_rows_out a permutation)
  reduce (out_rows=N): y [N, out],        y[t] = sum of p_i over {i : sorted_rows_out[i] == t}
Without grouped_in, every row of x must be read the same number of times, L / M (tokens k times, slots once);
the input gradient of a row read several times is summed the same way as a reduce.

With a RoutingPlan `plan` (N tokens, top-k; slot = token * k + choice; sorted_slots grouped by expert,
sorted_tokens = sorted_slots // k, sorted_gates the gates in that order), the model's calls would be:
  MoE MLP  up:    h = scattered_experts(x, W_in, plan.sorted_tokens, plan.expert_ends, None,
                                        grouped_in=False, grouped_out=True)              # [N*k, 2I] grouped
           down:  y = scattered_experts(act(h_gate) * h_up, W_out, None, plan.expert_ends, plan.sorted_tokens,
                                        grouped_in=True, grouped_out=False,
                                        gates=plan.sorted_gates, out_rows=N) + bias      # [N, H]
  MoA      map:   q = scattered_experts(x, W_q, plan.sorted_tokens, plan.expert_ends, plan.sorted_slots,
                                        grouped_in=False, grouped_out=False)             # [N*k, Nkv*D] slot order
           reduce: o = scattered_experts(slot_out, W_o, plan.sorted_slots, plan.expert_ends, plan.sorted_tokens,
                                        grouped_in=False, grouped_out=False,
                                        gates=plan.sorted_gates, out_rows=N) + bias      # [N, H]

Differentiable (torch.autograd.Function) in x, weight and gates: dX (rows read several times are summed), dW
per expert (zeros for an empty expert), dGates (fused into the dX kernel as per-column-tile partial dot
products, then summed). Every product accumulates in fp32; fp32 inputs use TF32 only where torch's
`torch.backends.cuda.matmul.allow_tf32` allows it, as F.linear does.

How it runs: only indices are sorted; activations are never copied into grouped order or padded. Each program
multiplies up to BLOCK_M consecutive grouped rows of ONE expert (row indices loaded from sorted_rows_in) by
a BLOCK_N column tile of that expert's weight, and stores the rows through sorted_rows_out. The per-program
(expert, first row, end row) table is computed on the device from expert_ends for a grid of
ceil(L / BLOCK_M) + E programs, the spare ones returning at once (ScatterMoE's scheme). The weight gradient
runs one program per (expert, weight tile), looping over that expert's rows.

Reduction choice (deterministic, no atomics): when several rows land on one output row (the gated reduce, and
the input gradient of tokens read k times), the kernel writes each row to its own slot of an fp32 [L, width]
buffer, placed by a stable argsort of the target index so that target t's rows occupy [t*c, (t+1)*c), and
the buffer viewed as [targets, c, width] is summed over c, then cast. Summation order = grouped order, the
same as an index_add over the grouped rows; results are bitwise reproducible. Cost: one fp32 [L, width]
temporary and one sort of L integers per reduce.

`scattered_experts_reference` (reference.py) has the same signature in plain torch (gather, F.linear loop,
index_add), for tests and for reading. `Blocks` sets tile sizes (`blocks=` keyword; tests use small tiles).
The kernels run anywhere triton runs; on CPU tensors only in triton's interpreter, i.e. with TRITON_INTERPRET=1
set before triton is first imported in the process (note that importing transformers imports triton), as the
tests do. Under the interpreter bf16 operands are upcast to fp32 before tl.dot (its bf16 dot is wrong). This package imports without triton; calling `scattered_experts` then raises
ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util

from .reference import scattered_experts_reference

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

if TRITON_AVAILABLE:
    from .kernels import Blocks
    from .scattered import scattered_experts
else:

    def scattered_experts(*args, **kwargs):
        raise ModuleNotFoundError("jetmoe.ops.triton.scattered_experts needs triton: pip install 'jetmoe[triton]'")


__all__ = ["TRITON_AVAILABLE", "scattered_experts", "scattered_experts_reference"]
