"""Distillation: the model also learns the probability-averaged prediction of finished models.

With --teachers FOLDER ... and --distill_weight w > 0, the engine loads the teachers once,
before training starts (ensemble.ModelEnsemble: read-only, checked, on the run's device, held
outside the training module, so checkpoints, the optimizer and DDP never see them). Each
micro-batch then carries the teachers' log-probabilities at temperature T under the key
TEACHER_LOG_PROBS, computed under no_grad in the run's autocast, outside the compiled model.
A trainer's objective adds w * distillation_loss(its logits, those log-probs, T) and logs it
as loss/distill. The term needs the model's full (B, T, V) logits: an objective that computes
its cross-entropy chunk by chunk (--chunked_loss) takes its full-logits path while distilling,
which costs the logits' memory once (about that of the teachers' log-probs it already holds).

The targets are a pure function of the batch, so resume stays exact.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .data import BatchSource, to_device
from .ensemble import ModelEnsemble, model_folder_problem
from .logs import get_logger
from .runtime import Runtime

TEACHER_LOG_PROBS = "teacher_log_probs"
log = get_logger("train")


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token, averaged over tokens (Hinton et al. 2015).

    student_logits (..., V); teacher_log_probs (..., V): the teachers' log-probabilities at
    temperature T (ensemble.ensemble_log_probs); the student's are log_softmax(logits / T).
    The T^2 keeps the gradient's scale independent of T."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)  # (N, V)
    teacher = teacher_log_probs.float().flatten(0, -2).clamp_min(torch.finfo(torch.float32).min)  # -inf: p = 0
    return temperature ** 2 * (teacher.exp() * (teacher - student)).sum(-1).mean()


class TeacherTargets:
    """A BatchSource: `source`'s batches, on the device, plus the teachers' log-probabilities."""

    def __init__(self, source: BatchSource, teachers: ModelEnsemble, temperature: float, runtime: Runtime):
        self.source, self.teachers, self.temperature, self.runtime = source, teachers, temperature, runtime

    def next_batch(self) -> dict:
        batch = to_device(self.source.next_batch(), self.runtime.device)
        with self.runtime.autocast():
            batch[TEACHER_LOG_PROBS] = self.teachers.log_probs(batch["input_ids"], self.temperature)
        return batch

    def micro_batches_per_epoch(self) -> int:
        return self.source.micro_batches_per_epoch()

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def teacher_folder_problems(cfg) -> list[str]:
    """Cheap checks of --teachers before any work: each is a finished model folder."""
    if not cfg.teachers or cfg.distill_weight <= 0:
        return []
    return [problem for folder in cfg.teachers if (problem := model_folder_problem(folder, "--teachers"))]


def with_teachers(task, cfg, runtime: Runtime, data):
    """The training task, its batches carrying the teachers' targets when distillation is on
    (--teachers and --distill_weight > 0); the teachers are loaded and checked here."""
    if not cfg.teachers or cfg.distill_weight <= 0:
        return task
    teachers = ModelEnsemble(cfg.teachers, runtime.device, cfg.block_size, "--teachers", task.vet_folder,
                             tokenizer=data.tokenizer)
    if runtime.is_main:
        log.info(f"distilling from {len(teachers.members)} teacher(s) (weight {cfg.distill_weight}, temperature "
                 f"{cfg.distill_temperature}): {', '.join(str(f) for f in teachers.folders)}")
    return dataclasses.replace(task, batches=TeacherTargets(task.batches, teachers, cfg.distill_temperature, runtime))
