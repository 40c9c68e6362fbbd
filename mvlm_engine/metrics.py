"""Throughput, MFU, the training history (JSON + TensorBoard) and the loss-curve plot."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import torch

from .fileio import atomic_write_text
from .logs import get_logger

# Dense bf16 peak, the one stated reference for MFU (docs/ARCHITECTURE.md, "Performance").
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# How MFU is counted, said in the logs, run_summary.json and the benchmarks.
FLOPS_CONVENTION = ("6 x matmul weights (output head included, embedding lookups not) + 12 x layers x d_model x "
                    "positions (attention), per scored token")


def matmul_weights(modules) -> int:
    """Weights that multiply activations in `modules`: every 2-D parameter outside nn.Embedding
    (linear and 1-D convolution weights). Embedding tables are lookups, not matmuls."""
    looked_up = {id(m.weight) for module in modules for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            if param.dim() == 2 and id(param) not in looked_up and id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def training_flops_per_token(body_matmul_weights: int, head_matmul_weights: int, n_layers: int, d_model: int,
                             seq_len: int, extra_positions: int = 0) -> float:
    """Training FLOPs per scored token, every matmul of the step counted (nanoGPT's and PaLM's
    convention, FLOPS_CONVENTION): 6 per matmul weight per position (2 forward, 4 backward), the
    output head included; attention 12 L d S per position (QK^T and AV, forward and backward, over
    S positions, not halved for the causal mask). Embedding lookups, norms, biases and element-wise
    ops are not counted.

    extra_positions: positions the body runs besides the seq_len scored ones (e.g. memory tokens
    before every sequence): the body and its attention run seq_len + extra_positions positions
    for seq_len scored tokens, so their share is scaled by that ratio; the head runs on the scored
    tokens only."""
    positions = seq_len + extra_positions
    body = 6 * body_matmul_weights + 12 * n_layers * d_model * positions
    return body * positions / seq_len + 6 * head_matmul_weights


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None, world_size: int) -> float | None:
    return None if peak is None else flops_per_token * tokens_per_second / (peak * world_size)


class History:
    """training_history.json: one record per logged step and per evaluation.

    save() writes it now (atomically, fsynced); save_soon() hands a snapshot of the records to a
    background thread and returns at once, so a logging step does not wait for the disk. A newer
    snapshot replaces one not yet written; save() and flush() wait for the thread, and an error
    it met (a full disk) is raised there, in the training thread."""

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.data = {"config": config, "train": [], "eval": []}
        self._pending: dict | None = None
        self._writing = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def resume(self, step: int) -> None:
        """Keep what an earlier run logged up to `step` (later records belong to a lost future)."""
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            self.data["train"] = [r for r in old.get("train", []) if r["step"] <= step]
            self.data["eval"] = [r for r in old.get("eval", []) if r["step"] <= step]

    def log(self, kind: str, record: dict) -> None:
        self.data[kind].append(record)

    def snapshot(self) -> dict:
        """The records as they are now (lists copied: later records are not part of it)."""
        return {key: list(value) if isinstance(value, list) else value for key, value in self.data.items()}

    def save(self) -> None:
        self.flush()
        self._write(self.snapshot())

    def save_soon(self) -> None:
        with self._changed:
            self._pending = self.snapshot()
            self._changed.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_pending, name="history-writer", daemon=True)
            self._thread.start()

    def flush(self, raise_errors: bool = True) -> None:
        """Wait until the background writes are done; raise the error one of them met."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending is None and not self._writing)
            error, self._error = self._error, None
        if error is not None and raise_errors:
            raise error

    def _write(self, data: dict) -> None:
        atomic_write_text(self.path, json.dumps(data, indent=1, allow_nan=True) + "\n")

    def _write_pending(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None)
                data, self._pending, self._writing = self._pending, None, True
            try:
                self._write(data)
            except BaseException as err:  # noqa: BLE001  (raised in the training thread by flush)
                self._error = err
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()


class TensorBoard:
    """Scalars to <output_dir>/tensorboard; silently off when tensorboard is not installed."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(folder))
            except ImportError:
                get_logger("train").info("tensorboard is not installed: scalars go to training_history.json only")

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_history(history: dict, path: Path, title: str) -> None:
    """Loss curves: training loss (and every loss term), held-out loss and bits per byte."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = history["train"], history["eval"]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (total)")
        for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in train], label=key, alpha=0.7, lw=1)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="held-out loss")
        ax_bpb.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", color="C3")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax_loss.legend(fontsize=7)
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="held-out bits per byte")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
