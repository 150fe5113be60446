"""Seeing a run: progress bar, metrics JSONL, per-layer expert load, PNG plots.

Expert load comes from the router logits the model returns with `output_router_logits=True`: for each router
(layer 0 MoA, layer 0 MoE, layer 1 MoA, ...) the top-k of its logits are the experts a token went to; the
share of (token, choice) assignments per expert is the load. Perfect balance is 1 / num_experts everywhere.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

METRICS_FILE = "metrics.jsonl"


class ExpertLoad:
    """Counts of (token, choice) assignments per router and expert, accumulated between log lines."""

    def __init__(self):
        self.counts: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, router_logits: tuple[torch.Tensor, ...], top_k: int) -> None:
        if not router_logits:
            return
        counts = torch.stack(
            [torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1]) for logits in router_logits]
        ).to("cpu", torch.float64)
        self.counts = counts if self.counts is None else self.counts + counts

    def add_counts(self, counts: torch.Tensor) -> None:
        """Counts already made ([routers, experts]; pipeline stages fill their own routers' rows)."""
        self.counts = counts if self.counts is None else self.counts + counts

    def take(self, runtime) -> dict | None:
        """{"moa": [[share per expert] per layer], "moe": [...]} over all processes; resets the counts."""
        if self.counts is None:
            return None
        counts = torch.tensor(runtime.sum(self.counts.flatten().tolist()), dtype=torch.float64).view_as(self.counts)
        self.counts = None
        shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        rounded = [[round(x, 4) for x in row] for row in shares.tolist()]
        return {"moa": rounded[0::2], "moe": rounded[1::2]}


class MetricsLog:
    """Appends JSON lines to OUT/metrics.jsonl (main process only)."""

    def __init__(self, out_dir: str, enabled: bool, resume_step: int | None):
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.enabled = enabled
        if enabled and resume_step is not None and os.path.exists(self.path):
            self._truncate_after(resume_step)
        elif enabled and resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in this folder starts a fresh log

    def _truncate_after(self, step: int) -> None:
        """Drop what a killed run logged after the checkpoint it resumes from (those steps are redone)."""
        with open(self.path) as handle:
            kept = [line for line in handle if line.strip() and _step_of(line) <= step]
        temp = self.path + ".tmp"
        with open(temp, "w") as handle:
            handle.writelines(kept)
        os.replace(temp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, ValueError, TypeError):
        return 1 << 62  # a torn last line from a killed run: drop it


def read_metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


class Progress:
    """A tqdm bar on the main process: loss, balancing loss, lr, tokens/s and ETA (tqdm's own)."""

    def __init__(self, enabled: bool, total: int, start: int, is_main: bool = True):
        self.bar = None
        self.is_main = is_main  # only the main process prints
        if enabled and is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")

    def update(self, steps: int, **values) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix({k: _short(v) for k, v in values.items()}, refresh=False)
        self.bar.update(steps)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.is_main:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


class Throughput:
    """Tokens per second over the steps since the last reading."""

    def __init__(self):
        self.since = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.since, 1e-9)
        self.since, self.tokens = now, 0
        return rate


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


def plot(out_dir: str) -> list[str]:
    """loss.png (train loss, balancing loss, validation loss) and expert_load.png (share per expert and layer)."""
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'jetmoe[train]')")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written = []
    if train:
        fig, (ax_loss, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot([r["step"] for r in train], [r["ce"] for r in train], label="train cross-entropy")
        if val:
            ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss (nats/token)")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_aux.plot([r["step"] for r in train], [r["aux"] for r in train], color="tab:orange")
        ax_aux.set_xlabel("step")
        ax_aux.set_ylabel("balancing loss")
        ax_aux.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "loss.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    loads = [r for r in records if r.get("expert_load")]
    if loads:
        last = loads[-1]["expert_load"]
        rows = [row for pair in zip(last["moa"], last["moe"]) for row in pair]
        labels = [f"L{i // 2} {'MoA' if i % 2 == 0 else 'MoE'}" for i in range(len(rows))]
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(rows[0]), 0.8 + 0.4 * len(rows)))
        image = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0)
        ax.set_yticks(range(len(rows)), labels)
        ax.set_xticks(range(len(rows[0])))
        ax.set_xlabel("expert")
        ax.set_title(f"share of tokens per expert (step {loads[-1]['step']})")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = os.path.join(out_dir, "expert_load.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
