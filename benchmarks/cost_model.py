"""What one token costs a JetMoE model: parameters, FLOPs and weight bytes, from the config alone.

These are the denominators of the benchmark's "fraction of the machine's limit" columns. Notation as in
docs/reference-semantics.md: V vocab, H hidden, L layers, Nkv K/V heads of size D, I expert width, E experts,
k experts per token (in both the attention mixture and the MLP mixture).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    V: int
    H: int
    L: int
    Nkv: int
    D: int
    I: int  # noqa: E741 (the paper's name)
    E: int
    k: int
    tied: bool

    @classmethod
    def of(cls, config) -> "Geometry":
        """From a JetMoeConfig (ours or transformers'; the field names are the same)."""
        return cls(
            V=config.vocab_size,
            H=config.hidden_size,
            L=config.num_hidden_layers,
            Nkv=config.num_key_value_heads,
            D=config.kv_channels,
            I=config.intermediate_size,
            E=config.num_local_experts,
            k=config.num_experts_per_tok,
            tied=config.tie_word_embeddings,
        )

    def layer_params(self, experts: float) -> float:
        """Parameters of one decoder layer when `experts` of the E experts of each mixture are counted."""
        H, Nkv, D, I, E = self.H, self.Nkv, self.D, self.I, self.E
        return (
            2 * H  # input and post-attention RMSNorm weights
            + 2 * Nkv * D * H  # kv_proj (shared K and V)
            + E * H  # attention router
            + experts * 2 * Nkv * D * H  # per-expert query and output projections
            + H  # attention output bias
            + E * H  # MLP router
            + experts * 3 * I * H  # per-expert GLU: input (2I x H) and output (H x I)
            + H  # MLP output bias
        )

    def total_params(self) -> int:
        """All parameters, tied embeddings counted once (what sum(p.numel()) over the model gives)."""
        head = 0 if self.tied else self.V * self.H
        return int(self.V * self.H + self.L * self.layer_params(self.E) + self.H + head)

    def active_matmul_params(self) -> int:
        """Weights that take part in a matmul for one token: k of E experts per mixture, both routers,
        kv_proj, and the lm_head. The embedding lookup and the norms/biases do no matmul and are left out."""
        H, Nkv, D, I, E, k = self.H, self.Nkv, self.D, self.I, self.E, self.k
        per_layer = 2 * Nkv * D * H + 2 * E * H + k * 2 * Nkv * D * H + k * 3 * I * H
        return self.L * per_layer + self.V * self.H

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward QK^T and PV FLOPs per token, averaged over a causal sequence of `seq_len` tokens.

        The token at position t (0-based) attends t+1 keys with k*Nkv query heads of size D:
        2*D*(t+1) FLOPs per head for QK^T and as many for PV. Summed over t and divided by T that is
        2*k*Nkv*D*(T+1) per layer. Only the causal (useful) half of the score matrix is counted.
        """
        return self.L * 2 * self.k * self.Nkv * self.D * (seq_len + 1)

    def forward_flops_per_token(self, seq_len: int) -> float:
        """2 FLOPs per active matmul weight (one multiply-add) plus causal attention."""
        return 2 * self.active_matmul_params() + self.attention_flops_per_token(seq_len)

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward = 3x the forward (backward computes the gradients of inputs and of weights)."""
        return 3 * self.forward_flops_per_token(seq_len)

    def expected_experts_touched(self, batch: int) -> float:
        """Distinct experts of one mixture that `batch` tokens select, each picking k of E at random:
        E * (1 - (1 - k/E)^batch). Exactly k for one token."""
        return self.E * (1 - (1 - self.k / self.E) ** batch)

    def decode_weight_bytes(self, batch: int, bytes_per_param: int) -> float:
        """Weight bytes one decode step of `batch` tokens reads: the embedding rows, every layer with the
        experts the batch touches (see expected_experts_touched), the final norm and the whole lm_head.
        The KV cache is not counted (at these lengths it is a few percent of the weights at most)."""
        params = (
            batch * self.H
            + self.L * self.layer_params(self.expected_experts_touched(batch))
            + self.H
            + self.V * self.H
        )
        return params * bytes_per_param

    def decode_roofline_tokens_per_s(self, batch: int, bytes_per_param: int, bandwidth_bytes_per_s: float) -> float:
        """Tokens/s if a decode step took exactly the time to stream its weights from memory once."""
        return batch * bandwidth_bytes_per_s / self.decode_weight_bytes(batch, bytes_per_param)
