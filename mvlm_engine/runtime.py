"""Where and how a run executes: processes (DDP), device, precision, compile, attention backend."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    precision: str  # bf16 | fp16 | fp32
    compile: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    # Modulo: launchers that show each process only its own GPU give LOCAL_RANK > 0 with one device.
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return requested


def resolve_compile(requested: bool | None, device: torch.device) -> bool:
    """Explicit flag, else the TORCH_COMPILE=0/1 environment switch, else on for CUDA only."""
    if requested is not None:
        return requested
    env = os.environ.get("TORCH_COMPILE")
    if env in ("0", "1"):
        return env == "1"
    return device.type == "cuda"


def start_runtime(device: str, precision: str, compile_flag: bool | None) -> Runtime:
    """Set up this process: under torchrun, join the process group (NCCL on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        # A long timeout: on a first run, the other ranks wait while rank 0 trains the tokenizer.
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=60))
    return Runtime(rank, local_rank, world_size, dev, resolve_precision(precision, dev),
                   resolve_compile(compile_flag, dev))


def stop_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sdpa_backend_name(runtime: Runtime, n_heads: int, head_dim: int) -> str:
    """Which fused attention kernel SDPA can use here, tried in PyTorch's own preference order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[runtime.precision]
    q = torch.randn(1, n_heads, 16, head_dim, device=runtime.device, dtype=dtype)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            return backend.name.lower()
        except RuntimeError:
            continue
    return "unknown"
