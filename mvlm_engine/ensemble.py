"""Finished model folders as one probability-averaged ensemble: the teachers of distillation
(distillation.py) and the ensembles whose held-out bits per byte `ensemble_bpb` measures.

A member is a finished model folder written by either trainer (save_pretrained weights,
config.json, tokenizer.json; a folder that ships its modelling code is loaded with it). It is
loaded read-only with transformers' AutoModelForCausalLM in fp32, in eval mode, without
gradients, and checked before anything runs: the folder is a model folder, every member
encodes text exactly as the others (and as the run) do, its vocabulary is the run's, every
weight is finite and its context holds a training block. Each problem is one UserError line.

The ensemble's distribution is the mean of the members' probabilities (not of their logits):
log p = logsumexp_i log_softmax(z_i / T) - log n.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import non_finite_values
from .corpus import load_corpus
from .errors import UserError
from .evaluation import evaluate
from .runtime import Runtime
from .tokenizer import encoding_fingerprint, eos_id, load_tokenizer, token_byte_lengths

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def ensemble_log_probs(logits: Iterable[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """log of the mean of softmax(z_i / T) over the members' logits z_i (each (..., V)), in fp32.
    The members are folded in one at a time, so only one member's logits are held at once."""
    total, count = None, 0
    for member_logits in logits:
        log_probs = F.log_softmax(member_logits.float() / temperature, dim=-1)
        total = log_probs if total is None else torch.logaddexp(total, log_probs)
        count += 1
    if total is None:
        raise ValueError("an ensemble needs at least one member")
    return total - math.log(count)


def model_folder_problem(folder: str | Path, flag: str) -> str | None:
    """Why `folder` is not a finished model folder (None if it is one)."""
    path = Path(folder)
    if not path.is_dir():
        return f"{flag} {path} {'is not a folder' if path.exists() else 'does not exist'}"
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if missing:
        return (f"{flag} {path} is not a finished model folder (no {', '.join(missing)}); give the --output_dir of "
                "a finished run")
    return None


def load_member(folder: Path, device: torch.device, flag: str) -> torch.nn.Module:
    """One member, read-only: fp32, eval mode, no gradients, finite weights, on `device`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the run's log, not a loading bar per member
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                     use_safetensors=True)  # never a pickled .bin
    except Exception as err:  # noqa: BLE001  (transformers raises many types on a broken folder)
        first_line = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{flag} {folder}: the model does not load ({first_line})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.to(device).eval().requires_grad_(False)
    if non_finite_values(model):
        raise UserError(f"{flag} {folder} holds NaN or infinite weights; give a folder of a run that finished well")
    return model


class ModelEnsemble:
    """The members of `folders`, checked against each other and against `tokenizer` (the run's)
    when given. Held in a plain object, so they are never part of a training module."""

    def __init__(self, folders: Sequence[str | Path], device: torch.device, block_size: int, flag: str,
                 vet: Callable[[Path], None] | None, tokenizer=None):
        if not folders:
            raise UserError(f"{flag}: no model folder given")
        if vet is None:
            raise UserError(f"{flag}: this program has no check of model folders from elsewhere, so it loads none")
        for folder in folders:
            problem = model_folder_problem(folder, flag)
            if problem:
                raise UserError(problem)
            vet(Path(folder))  # a folder's own modelling code runs as it loads: checked first, refused in one line
        self.folders = [Path(f) for f in folders]
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.folders[0] / "tokenizer.json")
        fingerprint, vocab = encoding_fingerprint(self.tokenizer), self.tokenizer.get_vocab_size()
        for folder in self.folders:
            if encoding_fingerprint(load_tokenizer(folder / "tokenizer.json")) != fingerprint:
                raise UserError(f"{flag} {folder} was trained with another tokenizer than "
                                f"{'this run' if tokenizer is not None else self.folders[0]}; its predictions are "
                                "over other tokens: give folders trained on the same --data_dir and --vocab_size")
        self.members = [load_member(folder, device, flag) for folder in self.folders]
        for folder, member in zip(self.folders, self.members):
            member_problem(member, folder, flag, vocab, block_size)

    @torch.no_grad()
    def log_probs(self, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(B, T, V) fp32: log of the members' mean probabilities at temperature T for input_ids (B, T)."""
        return ensemble_log_probs((m(input_ids=input_ids, use_cache=False).logits for m in self.members), temperature)


def member_problem(member: torch.nn.Module, folder: Path, flag: str, vocab: int, block_size: int) -> None:
    config = member.config
    if config.vocab_size != vocab:
        raise UserError(f"{flag} {folder} has a vocabulary of {config.vocab_size} tokens, the tokenizer {vocab}")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and context < block_size:
        raise UserError(f"{flag} {folder} reads at most {context} tokens, fewer than a block of {block_size}; "
                        f"lower --block_size to {context} or give a model with a longer context")


def held_out_tokens(data_dir: str | Path, tokenizer) -> np.ndarray:
    """The held-out split as the token shards hold it: each document's ids, then EOS."""
    eos, tokens = eos_id(tokenizer), []
    documents = list(load_corpus(data_dir, announce=False).documents("val"))
    for encoding in tokenizer.encode_batch_fast(documents, add_special_tokens=False):
        tokens += encoding.ids + [eos]
    return np.asarray(tokens, dtype=np.int64)


def evaluate_ensemble(folders: Sequence[str | Path], data_dir: str | Path, block_size: int, eval_windows: int,
                      vet: Callable[[Path], None], batch_size: int = 8, device: str = "cpu",
                      precision: str = "fp32") -> dict:
    """{"val_loss", "val_bpb"} of the probability-averaged ensemble of `folders` on the held-out
    split of `data_dir`: the same windows, loss and bytes as the trainer's evaluation with that
    --block_size, --eval_windows and --batch_size (mvlm_engine/evaluation.py). `vet` checks each
    folder before it loads (release.trust.vet_folder)."""
    runtime = Runtime(0, 0, 1, torch.device(device), precision, False)
    ensemble = ModelEnsemble(folders, runtime.device, block_size, "ensemble member", vet)
    tokens = held_out_tokens(data_dir, ensemble.tokenizer)
    lengths = torch.as_tensor(token_byte_lengths(ensemble.tokenizer), device=runtime.device)
    return evaluate(torch.nn.ModuleList(ensemble.members), lambda members, x: ensemble.log_probs(x), tokens,
                    block_size, eval_windows, batch_size, runtime, lengths)


def ensemble_bpb(folders: Sequence[str | Path], data_dir: str | Path, block_size: int, eval_windows: int,
                 vet: Callable[[Path], None], batch_size: int = 8, device: str = "cpu", precision: str = "fp32") -> float:
    """Held-out bits per byte of the probability-averaged ensemble of the model folders
    `folders` (one folder: that model's own), measured as the trainer measures it."""
    return evaluate_ensemble(folders, data_dir, block_size, eval_windows, vet, batch_size, device, precision)["val_bpb"]
