"""The fault suite's small pieces (tests/test_reliability_*.py): a tiny module with its optimizer
state, its checkpoints, and another process holding a folder's lock."""
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mvlm_engine.checkpoint import load_checkpoint, save_checkpoint
from mvlm_engine.runtime import Runtime


CPU = Runtime(0, 0, 1, torch.device("cpu"), "fp32", False)


def tiny_training_state(width=64):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module(torch.randn(3, width)).sum().backward()
    optimizer.step()
    return module, optimizer


def state_for(step):
    return {"step": step, "best_val_loss": 1.5, "bad_steps": 0, "data": {"epoch": 0, "position": 8},
            "tokenizer_hash": "abc"}


def save(folder, module, optimizer, step=10):
    return save_checkpoint(folder, module, optimizer, None, state_for(step), {"k": 1})


def load(folder, module, optimizer):
    return load_checkpoint(folder, module, optimizer, None, "abc")


def hold_lock_in_child(folder: Path, purpose="training by a test") -> subprocess.Popen:
    """Another process holding `folder`'s lock until it is killed."""
    code = ("import sys, time; from mvlm_engine.locks import lock_folder; "
            f"lock = lock_folder(sys.argv[1], {purpose!r}); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def small_disk_free(disk):
    return shutil.disk_usage(disk).free
