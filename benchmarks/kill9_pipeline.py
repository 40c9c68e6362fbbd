"""kill -9 of the whole pipeline (`kill9_trials.py --pipeline`): train_all_models.py, from the corpus
build to the archive checks, is killed (SIGKILL to its whole process group) at a seeded moment of a
seeded stage, then run again with the same command; the rerun must end as an uninterrupted run does.

Each trial aims at one phase of the run, in turn: the corpus build, a tokenizer training (its
child process running), a token-cache build, a model's training loop, a checkpoint write, the
validation, the packaging, an archive write, the archive checks. The phases are read from the run's
own progress: the stage the orchestrator announced on stdout and the staging files each writer
makes (the corpus's .building folder, the tokenizer child's spec file, the token cache's and the
archives' PID@host staging names, checkpoints' .tmp- folders, a model's training_history.json).
The uninterrupted reference run records when each phase began and how long it lasted; a trial kills
a seeded fraction of that time after it enters a seeded occurrence of its phase (writes: the moment
their staging file appears), the time scaled by how much faster or slower the trial reached the
phase than the reference did (the machine's load changes between runs), and at once should the
phase end before that moment; it records the phase the kill really landed in. A kill that missed its
phase (it, or the run, ended first) starts over in a clean folder with half the delay, up to three runs.

After the kill and the rerun, a trial passes when the rerun exits 0 and: every model's
model.safetensors and every .gguf are byte-identical to the reference's; training_summary.json
lists every stage, each finished; SHA256SUMS verifies and lists every download; the validation
report is whole and passed; and no staging file, .tmp-/.old- folder, build marker or lock file is
left anywhere (a tokenizer child that outlived the kill is waited for first: it writes nothing once
its parent is gone).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from model_registry import MODELS
from mvlm_engine.corpus import BUILD_MARKER
from mvlm_engine.fileio import STAGING
from mvlm_engine.packaging import check_sha256sums

REPO = Path(__file__).resolve().parent.parent
# Tiny models, a two-translation corpus and a short validation: one uninterrupted run takes a minute
# or two on two idle CPU cores.
CORPUS_ARGS = "--translations KJV,WEB --books Jonah,Mark"
TRAINER_ARGS = ("--max_steps 8 --vocab_size 512 --batch_size 4 --block_size 64 --eval_interval 4 --save_interval 2 "
                "--log_interval 2 --eval_windows 4 --seed 5")
VALIDATE_ARGS = "--eval_windows 4 --recall_verses 2 --retrieval_pairs 10"
# The phases a trial aims at, in turn; a write is killed the moment its staging file appears.
AIMS = ("corpus build", "tokenizer child", "shard build", "training gpt2", "checkpoint write", "training simone",
        "validate", "package", "archive write", "archives")
WRITES = ("checkpoint write", "archive write", "gguf write")
POLL = 0.001  # seconds between looks at the run's progress
RUN_TIMEOUT = 3600  # seconds one run may take, however loaded the machine
STAGE_LINE = re.compile(rb"=== stage (\S+):")
FINISHED = {"corpus": ("done", "skipped (already built)"), "validate": ("passed",), "package": ("done",),
            "archives": ("passed",)}
TRAINED = ("done", "resumed and done", "skipped (already trained)")


def pipeline_command(root: Path, only: str | None = None) -> list[str]:
    """train_all_models.py on CPU, everything under `root` (the corpus too: its stage builds it)."""
    return [sys.executable, str(REPO / "train_all_models.py"), "--preset", "tiny", "--device", "cpu",
            "--data_dir", str(root / "corpus"), "--models_dir", str(root / "models"),
            "--download_dir", str(root / "downloads"), "--logs_dir", str(root / "logs"),
            "--corpus_args", CORPUS_ARGS, "--trainer_args", TRAINER_ARGS, "--validate_args", VALIDATE_ARGS,
            *(["--only", only] if only else [])]


def staged(folder: Path) -> list[str]:
    """Names of the PID@host staging files and folders in `folder`."""
    try:
        return [name for name in os.listdir(folder) if STAGING.search(name)]
    except OSError:
        return []


def current_phase(root: Path, stage: str) -> str:
    """The most specific phase the run under `root` is in, read from its files; else its stage."""
    cache = root / "corpus" / ".cache"
    if (root / "corpus" / ".building").exists():
        return "corpus build"
    if any(cache.glob("tokenizers/*/.training_spec.json.*.tmp")):
        return "tokenizer child"  # the spec file lives exactly as long as the child process runs
    if staged(cache / "tokens"):
        return "shard build"
    if any(root.glob("models/*/checkpoints/.tmp-*")):
        return "checkpoint write"
    downloads = staged(root / "downloads")
    if any(".tar.gz." in name for name in downloads):
        return "archive write"
    if any(".gguf." in name for name in downloads):
        return "gguf write"
    if stage in MODELS and (root / "models" / MODELS[stage].folder / "training_history.json").exists():
        return f"training {stage}"
    return stage


@dataclass
class Segment:
    phase: str
    stage: str
    start: float
    end: float = 0.0


class WatchedRun:
    """The pipeline in its own process group, its output read in a thread (and kept in
    `root`/pipeline.out); `stage` is the stage it last announced."""

    def __init__(self, command: list[str], root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.stage, self.segments, self.started = root, "start", [], time.monotonic()
        self.output = open(root / "pipeline.out", "ab")
        self.proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            self.output.write(line)
            match = STAGE_LINE.search(line)
            if match:
                self.stage = match.group(1).decode()

    def look(self) -> Segment:
        """The phase now; a new Segment when it changed since the last look."""
        phase, now = current_phase(self.root, self.stage), time.monotonic()
        if not self.segments or self.segments[-1].phase != phase:
            if self.segments:
                self.segments[-1].end = now
            self.segments.append(Segment(phase, self.stage, now))
        return self.segments[-1]

    def wait(self) -> int:
        code = self.proc.wait()
        self.reader.join()
        self.output.close()
        if self.segments:
            self.segments[-1].end = time.monotonic()
        return code


def reference_run(root: Path, only: str | None = None) -> list[Segment]:
    """The uninterrupted run: the files every trial must end with, and when each phase began and ended
    (seconds from the run's start)."""
    run, deadline = WatchedRun(pipeline_command(root, only), root), time.monotonic() + RUN_TIMEOUT
    while run.proc.poll() is None and time.monotonic() < deadline:
        run.look()
        time.sleep(POLL)
    if run.proc.poll() is None:
        os.killpg(run.proc.pid, signal.SIGKILL)
    if run.wait() != 0:
        tail = (root / "pipeline.out").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"the reference run failed; the end of {root / 'pipeline.out'}:\n{tail}")
    # Times from the run's start, so a trial can compare its pace with the reference's.
    return [Segment(s.phase, s.stage, s.start - run.started, s.end - run.started) for s in run.segments
            if s.end > s.start]


def kill_at(run: WatchedRun, aim: Aim) -> Segment | None:
    """SIGKILL the run's process group inside the `aim.occurrence`-th (from 0) segment of `aim.phase`:
    `aim.delay` seconds after entering it, scaled by the trial's pace against the reference's (the time
    each took to reach the segment), or the moment the segment ends if that comes first. Returns the
    segment it was in at the kill (None: the run ended first)."""
    seen, entered, delay = 0, None, aim.delay
    while run.proc.poll() is None:
        before = len(run.segments)
        segment = run.look()
        if entered is None and len(run.segments) > before and segment.phase == aim.phase:
            seen += 1
            if seen > aim.occurrence:
                entered = segment
                delay = aim.delay * pace(segment.start - run.started, aim.reference_offset)
        if entered is not None and (segment is not entered or time.monotonic() - entered.start >= delay):
            os.killpg(run.proc.pid, signal.SIGKILL)
            return segment
        time.sleep(POLL)
    return None


def pace(trial_seconds: float, reference_seconds: float) -> float:
    """How much slower (>1) or faster the trial reached its aim than the reference, within 4x either way."""
    if reference_seconds <= 1.0:
        return 1.0
    return min(4.0, max(0.25, trial_seconds / reference_seconds))


@dataclass
class Aim:
    phase: str
    occurrence: int
    fraction: float
    delay: float
    reference_seconds: float = field(default=0.0)
    reference_offset: float = field(default=0.0)  # seconds from the reference's start to the segment


def choose_aim(segments: list[Segment], phase: str, rng: random.Random) -> Aim | None:
    """A seeded occurrence of `phase` in the reference and a seeded moment of it (writes: at once)."""
    matching = [s for s in segments if s.phase == phase]
    if not matching:
        return None
    occurrence = rng.randrange(len(matching))
    seconds = matching[occurrence].end - matching[occurrence].start
    fraction = 0.0 if phase in WRITES else rng.random()
    return Aim(phase, occurrence, fraction, fraction * seconds, seconds, matching[occurrence].start)


def tokenizer_children(root: Path) -> list[int]:
    """PIDs of tokenizer-training children working for a run under `root` (their spec path names it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"mvlm_engine.tokenizer" in command and any(str(root).encode() in c for c in command) and state != "Z":
                pids.append(int(entry))
    return pids


def wait_for_orphans(root: Path, timeout: float = 600) -> int:
    """Wait until no tokenizer child of the killed run is left (it is in its own session, so the
    kill did not reach it; it writes nothing once its parent is gone). Returns how many there were."""
    orphans = tokenizer_children(root)
    deadline = time.monotonic() + timeout
    while tokenizer_children(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(orphans)


def leftovers(root: Path) -> list[str]:
    """Staging files and folders, .tmp-/.old- checkpoint folders, build markers and lock files
    anywhere under `root`."""
    found = []
    for path in root.rglob("*"):
        name = path.name
        if STAGING.search(name) or name.startswith((".tmp-", ".old-")) or name in (".building", BUILD_MARKER) \
                or name.endswith(".lock"):
            found.append(str(path.relative_to(root)))
    return sorted(found)


def summary_problems(root: Path, models: list[str]) -> list[str]:
    """training_summary.json lists every stage in order, each one finished."""
    try:
        stages = json.loads((root / "models" / "training_summary.json").read_text())["stages"]
        statuses = [(s["stage"], s["status"]) for s in stages]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"training_summary.json unreadable ({type(err).__name__})"]
    expected = ["corpus", *models, "validate", "package", "archives"]
    if [name for name, _ in statuses] != expected:
        return [f"training_summary.json lists {[name for name, _ in statuses]}, not {expected}"]
    return [f"stage {name}: {status}" for name, status in statuses
            if status not in FINISHED.get(name, TRAINED)]


def report_problems(root: Path, folders: list[str]) -> list[str]:
    try:
        report = json.loads((root / "models" / "validation_report.json").read_text())
        markdown = (root / "models" / "validation_report.md").read_text()
    except (OSError, ValueError) as err:
        return [f"validation report unreadable ({type(err).__name__})"]
    problems = [] if report.get("passed") is True else ["the validation report did not pass"]
    if set(report.get("models", {})) != {*folders, "archives"}:
        problems.append(f"the validation report covers {sorted(report.get('models', {}))}")
    return problems + ([] if markdown.startswith("# Validation report") else ["validation_report.md is not whole"])


def download_problems(root: Path, reference: Path, folders: list[str]) -> list[str]:
    """SHA256SUMS verifies and lists every download; each .gguf is the reference's, byte for byte."""
    downloads = root / "downloads"
    problems = check_sha256sums(downloads)
    listed = {line.split("  ", 1)[-1] for line in (downloads / "SHA256SUMS").read_text().splitlines()} \
        if (downloads / "SHA256SUMS").is_file() else set()
    wanted = {f"{f}.tar.gz" for f in folders} | {p.name for p in (reference / "downloads").glob("*.gguf")}
    problems += [f"SHA256SUMS does not list {name}" for name in sorted(wanted - listed)]
    problems += [f"{p.name} differs from the reference's" for p in sorted((reference / "downloads").glob("*.gguf"))
                 if not (downloads / p.name).is_file() or (downloads / p.name).read_bytes() != p.read_bytes()]
    return problems


def different_weights(root: Path, reference: Path, folders: list[str]) -> list[str]:
    return [folder for folder in folders if not (root / "models" / folder / "model.safetensors").is_file() or
            (root / "models" / folder / "model.safetensors").read_bytes() !=
            (reference / "models" / folder / "model.safetensors").read_bytes()]


def rerun_problems(root: Path, reference: Path, only: str | None) -> tuple[list[str], str]:
    """Run the same command again, plainly; (what differs from an uninterrupted run, its output)."""
    proc = subprocess.run(pipeline_command(root, only), cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
    (root / "rerun.out").write_text(proc.stdout + proc.stderr)
    models = [only] if only else list(MODELS)
    folders = [MODELS[m].folder for m in models]
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"the rerun exited {proc.returncode}: {last}"], proc.stdout
    problems = [f"{folder}/model.safetensors differs" for folder in different_weights(root, reference, folders)]
    problems += summary_problems(root, models) + download_problems(root, reference, folders)
    return problems + report_problems(root, folders), proc.stdout


def pipeline_trial(work: Path, reference: Path, segments: list[Segment], phase: str, seed: int,
                   only: str | None = None) -> dict | None:
    """One kill -9 aimed at `phase` (None when the reference has no such phase), then a plain rerun."""
    aim = choose_aim(segments, phase, random.Random(seed))
    if aim is None:
        return None
    root, started = work / f"trial_{seed}", time.monotonic()
    code, landed, tries = aimed_kill(root, aim, only)
    debris, orphans = leftovers(root), wait_for_orphans(root)
    problems, log = rerun_problems(root, reference, only)
    left = leftovers(root)
    problems += [f"left behind: {', '.join(left)}"] if left else []
    killed = code == -signal.SIGKILL
    return {"seed": seed, "aim": aim, "landed": landed.phase if landed else "after the run ended",
            "stage": landed.stage if landed else "", "killed": killed, "debris": debris, "orphans": orphans,
            "took_over": "[lock] took over" in log, "problems": problems, "passed": killed and not problems,
            "tries": tries, "seconds": time.monotonic() - started}


def aimed_kill(root: Path, aim: Aim, only: str | None, tries: int = 3) -> tuple[int, Segment | None, int]:
    """Run the pipeline in `root` and kill it as `aim` says. A kill that misses its phase (the phase, or
    the run, ended first: the machine ran faster than in the reference) starts over in a clean `root`
    with half the delay, up to `tries` runs. Returns the exit code, the segment killed in, the runs made."""
    attempt = 1
    while True:
        run = WatchedRun(pipeline_command(root, only), root)
        landed = kill_at(run, aim)
        code = run.wait()
        if (landed is not None and landed.phase == aim.phase) or attempt == tries:
            return code, landed, attempt
        wait_for_orphans(root)
        shutil.rmtree(root)
        aim, attempt = dataclasses.replace(aim, delay=aim.delay / 2), attempt + 1


def run_pipeline_trials(work: Path, trials: int, seed: int, only: str | None = None,
                        aims: tuple[str, ...] = AIMS) -> list[dict]:
    """The reference run, then `trials` trials aimed at `aims` in turn (trial i: seed + i); phases the
    reference never went through (a model left out by `only`) are passed over."""
    segments = reference_run(work / "reference", only)
    (work / "reference" / "segments.json").write_text(json.dumps([s.__dict__ for s in segments], indent=1))
    usable = [phase for phase in aims if any(s.phase == phase for s in segments)]
    if not usable:
        raise RuntimeError(f"the reference run went through none of {', '.join(aims)}")
    return [pipeline_trial(work, work / "reference", segments, usable[i % len(usable)], seed + i, only)
            for i in range(trials)]


def describe(result: dict) -> str:
    aim = result["aim"]
    moment = "the moment it began" if aim.phase in WRITES else \
        f"{aim.fraction:.2f} of the reference's {aim.reference_seconds:.1f} s into it"
    landed = f"{result['landed']} (stage {result['stage']})" if result["stage"] else result["landed"]
    extra = f"; left at the kill: {len(result['debris'])} staging/lock files" if result["debris"] else ""
    extra += f"; {result['orphans']} tokenizer child outlived the kill" if result["orphans"] else ""
    extra += f"; aimed {result['tries']} times (a kill after its phase ended starts over, half as late)" \
        if result["tries"] > 1 else ""
    verdict = "PASSED" if result["passed"] else "FAILED: " + "; ".join(result["problems"] or ["not killed"])
    return (f"trial seed {result['seed']}: aimed at {aim.phase} #{aim.occurrence + 1}, {moment}; killed in "
            f"{landed}{extra}; rerun {verdict} ({result['seconds']:.0f} s)")


def print_pipeline_results(results: list[dict]) -> bool:
    """One line per trial and the totals; True when every trial passed."""
    for result in results:
        print(describe(result), flush=True)
    passed, killed = sum(r["passed"] for r in results), sum(r["killed"] for r in results)
    landed = ", ".join(f"{r['landed']} ({r['stage']})" if r["stage"] else r["landed"] for r in results)
    print(f"pipeline: {passed}/{len(results)} trials passed (SIGKILL ended {killed}); the kills landed in: {landed}")
    return passed == len(results)
