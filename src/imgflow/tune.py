"""`imgflow tune`: hyperparameter search with Optuna, every trial a training run, judged on validation.

Each trial trains the base configuration (a preset or `train` options) with some values drawn
from the search space, into OUT/trials/NNN, and scores it by the validation accuracy of the
weights it saves. Trials that trail the median of earlier ones at the same epoch are stopped
there (Optuna's MedianPruner), as are those whose loss diverges. The study lives in
OUT/study.db (SQLite): running the same command again continues it.

Several workers can share one study through Optuna's own storages (`--storage`): a journal file
for processes on one machine (SQLite locks under concurrent writers), a PostgreSQL or MySQL URL
for machines. Optuna hands each `ask` a distinct trial, so no trial runs twice; each worker
writes tune.json and the report whole from the study, one at a time (a lock file in OUT).

Reproducible: every trial trains with the base seed (so trials differ only in what is searched),
and the sampler is re-seeded before each trial from (seed, trials finished so far). What a trial
samples then depends only on the trials before it, so an interrupted study, continued, proposes
what an uninterrupted one would; the trial that was cut short is run again with its values and
continues its training run from the last checkpoint. With several workers, which trial samples
what depends on their timing: the study is then a search, not a reproducible sequence.
"""
from __future__ import annotations

import dataclasses
import logging
import contextlib
import math
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.errors import UserError
from imgflow.fileio import expect, read_json_checked, write_json
from imgflow.history import read_history
from imgflow.progress import progress_bar
from imgflow.reports.tune_report import write_tune_report
from imgflow.runs import holds_run, load_run_data, read_run_config
from imgflow.text import plural
from imgflow.training.config import AUGMENTS, MAX_LR, MAX_WEIGHT_DECAY, OPTION_OF, PHOTO, TrainConfig, command_line_options

log = logging.getLogger(__name__)

STUDY_NAME = "imgflow-tune"
STUDY_FILE = "study.db"
RECORD_FILE = "tune.json"
LOCK_FILE = ".tune.lock"
UNSIGNED_SECONDS = 60  # a running trial without its worker's name older than this was left by an old imgflow
STARTUP_TRIALS = 4  # random trials before TPE models the results, and before any pruning


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One searched option: its kind ('log', 'float' or 'choice') and range or choices."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def suggest(self, trial, name: str):
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.choices))
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "log")

    def contains(self, value) -> bool:
        return value in self.choices if self.kind == "choice" else self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(map(str, self.choices))
        return f"{self.low:g} .. {self.high:g}" + (" (log scale)" if self.kind == "log" else "")


def search_space(base: TrainConfig) -> dict[str, Dimension]:
    """What can be searched, around the base configuration where it has a scale (the lr)."""
    # Ten times the base, but never past what a training run accepts.
    decay = (base.weight_decay / 10, min(base.weight_decay * 10, MAX_WEIGHT_DECAY)) if base.weight_decay > 0 \
        else (1e-5, 1e-2)
    return {
        "lr": Dimension("log", base.lr / 10, min(base.lr * 10, MAX_LR)),
        "weight_decay": Dimension("log", *decay),
        "label_smoothing": Dimension("float", 0.0, 0.3),
        # photo changes the decoded size and the evaluation crop: a choice of its own, not a trial's.
        "augment": Dimension("choice", choices=tuple(a for a in AUGMENTS if a != PHOTO)),
        "momentum": Dimension("float", 0.8, 0.95),
    }


DEFAULT_SEARCH = ("lr", "weight_decay", "label_smoothing", "augment")


def parse_search(text: str | None, base: TrainConfig) -> dict[str, Dimension]:
    """'lr,weight-decay' -> the named dimensions; None -> DEFAULT_SEARCH."""
    space = search_space(base)
    names = DEFAULT_SEARCH if text is None else [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in space]
    if unknown or not names:
        raise UserError(f"cannot search {', '.join(unknown) or 'nothing'}: --search takes a comma-separated "
                        f"list of {', '.join(n.replace('_', '-') for n in space)}")
    return {n: space[n] for n in dict.fromkeys(names)}


def _check_base(base: TrainConfig) -> None:
    if not base.val_split and not base.folds:
        raise UserError("tune compares trials on validation data, and --val-split is 0: give --val-split "
                        "(e.g. 0.2) or --folds")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("imgflow tune needs Optuna: pip install 'optuna>=4'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # imgflow logs each trial itself
    return optuna


def _base_record(out: Path, base: TrainConfig, space: dict[str, Dimension], storage: str | None = None) -> dict:
    """What the study in OUT was started with; a different base, search space or storage is refused."""
    started = {"base": base.to_dict(), "search": {n: d.describe() for n, d in space.items()}}
    if storage is not None:  # absent for OUT/study.db, as in records from before --storage
        started["storage"] = _without_password(storage)
    path = out / RECORD_FILE
    if path.is_file():
        record = read_json_checked(path, "tune record", lambda r: expect(r, "an object", "the file"),
                                   "restore it, or choose another --out")
        before = {k: record.get(k) for k in (*started, "storage") if k in started or k in record}
        if before != started:
            raise UserError(f"{out} holds a study of other settings: run the same command as before to "
                            "continue it, or choose another --out")
    elif (out / STUDY_FILE).exists() or holds_run(out) or (out / "workflow.json").exists():
        raise UserError(f"{out} holds something other than an imgflow study: choose another --out")
    return started


def _trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    return dataclasses.replace(base, **params).validate()


def _trial_dir(out: Path, index: int) -> Path:
    return out / "trials" / f"{index:03d}"


def _finished_count(study, optuna) -> int:
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def _claimed_count(study, optuna, below: int | None = None) -> int:
    """Trials finished or being run (by any worker), of those numbered below `below` if given."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if below is None or t.number < below)


def _enqueue_base(study, base: TrainConfig, space: dict[str, Dimension]) -> None:
    """The first trial is the base configuration itself: the score the search has to beat.

    Left out when a base value lies outside the space (a weight decay of 0 on a log scale).
    """
    values = {name: getattr(base, name) for name in space}
    if all(dim.contains(values[name]) for name, dim in space.items()):
        study.enqueue_trial(values, user_attrs={"base": True})
    else:
        log.info("the base configuration is not a trial: %s lies outside the search space",
                 ", ".join(f"{n}={values[n]}" for n, d in space.items() if not d.contains(values[n])))


def _worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _was_interrupted(trial) -> bool:
    """Whether a running trial's worker is gone: it ran in this process, or in one on this machine
    that no longer exists. A trial run on another machine is left to that machine's workers."""
    worker = trial.user_attrs.get("worker")
    if worker is None:
        # A trial from before workers were recorded, or one a worker on another machine has just
        # asked for and not yet signed (on this machine, asking and signing hold the lock).
        return trial.datetime_start is None or time.time() - trial.datetime_start.timestamp() > UNSIGNED_SECONDS
    if worker["host"] != socket.gethostname():
        return False
    if worker["pid"] == os.getpid():
        return True
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _requeue_interrupted(study, optuna) -> None:
    """A trial a gone worker left running is failed and queued again with its values and run."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _was_interrupted(trial):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another machine's worker got there first
            continue
        study.enqueue_trial(trial.params, user_attrs={"continues": trial.number, "run": trial.user_attrs.get("run"),
                                                      "base": trial.user_attrs.get("base", False)})
        log.info("trial %d was interrupted: it runs again and continues its training run", trial.number)


def _three_digits(value):
    """A sampled float to 3 significant digits: what the trial trains with and the printed command says."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


def _run_trial(trial, optuna, base: TrainConfig, space: dict[str, Dimension], out: Path, index: int,
               progress: bool) -> float:
    """Train one trial's run; return its score. Raises optuna.TrialPruned when it is stopped."""
    from imgflow.training.crew import together
    from imgflow.training.loop import train
    from imgflow.training.step import TrainingDiverged

    params = {name: _three_digits(dim.suggest(trial, name)) for name, dim in space.items()}
    trial.set_user_attr("trained", params)
    config = _trial_config(base, params)
    # A trial queued again continues the run it was interrupted in.
    run_dir = out / trial.user_attrs["run"] if trial.user_attrs.get("run") else _trial_dir(out, index)
    trial.set_user_attr("run", str(run_dir.relative_to(out)))  # OUT may move

    def report(row: dict) -> None:
        if row.get("val_acc") is None:
            return
        trial.report(row["val_acc"], row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {row['val_acc']:.4f} at epoch {row['epoch']} "
                                     "trails the median of earlier trials")

    resume = run_dir.is_dir()
    if resume and (run_dir / "history.csv").is_file():  # epochs a cut-short invocation already trained
        for row in read_history(run_dir / "history.csv"):
            report(row)
    try:
        # Under torchrun every rank trains the trial (`training.crew`); rank 0 alone reports to the study.
        together(train, config, run_dir, resume=resume, local={"progress": progress, "on_epoch": report})
    except TrainingDiverged as exc:
        trial.set_user_attr("diverged", str(exc))
        raise optuna.TrialPruned(f"diverged: {exc}") from None
    return float(read_run_config(run_dir)["result"]["final_val_accuracy"])


def run_tune(base: TrainConfig, out: Path, trials: int, search: str | None = None,
             budget_minutes: float | None = None, progress: bool = False, storage: str | None = None) -> dict:
    """Run (or continue) a study of `trials` trials in `out`; return the record written to tune.json.

    storage: where the study lives, for several workers sharing it (see `open_storage`);
    None keeps it in OUT/study.db.

    Under torchrun, every rank trains each trial; rank 0 alone keeps the study, writes OUT and
    decides (`training.crew`), and every rank returns its record.
    """
    from imgflow.training.crew import lead_or_follow

    return lead_or_follow(base.device, lambda: _run_study(base, Path(out), trials, search, budget_minutes,
                                                          progress, storage))


def _run_study(base: TrainConfig, out: Path, trials: int, search: str | None, budget_minutes: float | None,
               progress: bool, storage: str | None) -> dict:
    """run_tune in one process (rank 0 under torchrun)."""
    space = _check_request(base, out, trials, search, budget_minutes)
    if storage is not None and "://" not in str(storage):
        _journal_path(str(storage))  # refused before anything is written
    out = Path(out)
    optuna = _optuna()
    storage_url = storage if storage is None else str(storage)
    with _one_writer(out, create=False):
        started = _base_record(out, base, space, storage_url)
    _check_data(base, progress)  # before anything is written: a wrong DATA leaves no study behind
    # One local worker at a time creates the study, queues its base trial and requeues a gone
    # worker's trial: two workers started together then neither queue the base twice nor both
    # continue one interrupted trial.
    with _one_writer(out):
        study = _open_study(out, base, space, optuna, storage_url)
        record = _write_record(out, study, optuna, started, trials)
    t0 = time.perf_counter()
    # Over the trials, with the best score so far; each trial's epochs show their own bar below.
    with progress_bar(enabled=progress, total=trials, initial=min(_finished_count(study, optuna), trials),
                      desc="tune", unit="trial") as bar:
        while True:
            with _one_writer(out):  # a worker on this machine that died: its trial is taken over
                _requeue_interrupted(study, optuna)
            # Trials other workers are running count as taken: together the workers start `trials`.
            if (index := _claimed_count(study, optuna)) >= trials:
                break
            if budget_minutes is not None and time.perf_counter() - t0 > budget_minutes * 60:
                log.info("budget of %g min used: %d of %s done; run the same command to go on",
                         budget_minutes, _finished_count(study, optuna), plural(trials, "trial"))
                break
            if not _next_trial(study, optuna, base, space, out, index, trials, progress):
                break
            with _one_writer(out):
                record = _write_record(out, study, optuna, started, trials)
            bar.n = min(_finished_count(study, optuna), trials)
            bar.refresh()
            if record["best"]:
                bar.set_postfix(best=f"{record['best']['val_acc']:.4f}")
    with _one_writer(out):
        record = _write_record(out, study, optuna, started, trials)
        write_tune_report(out, record)
    return record


@contextlib.contextmanager
def _one_writer(out: Path, create: bool = True):
    """Held while a worker reads the study and writes OUT's files: one process on this machine at a time.

    create=False: OUT is not made, and a folder that holds no study yet (a training run, say,
    which the caller is about to refuse) gets no lock file.
    """
    import fcntl

    if not create and not (out / RECORD_FILE).is_file():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_record(out: Path, study, optuna, started: dict, trials: int) -> dict:
    """tune.json, whole, from the study as it is now."""
    record = _record(study, optuna, started, trials)
    write_json(out / RECORD_FILE, record)
    return record


def _check_request(base: TrainConfig, out: Path, trials: int, search: str | None,
                   budget_minutes: float | None) -> dict[str, Dimension]:
    """The search space, once the arguments are known to make a study: a UserError if not."""
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if budget_minutes is not None and not 0 < budget_minutes < math.inf:
        raise UserError(f"--budget-minutes must be a number > 0, got {budget_minutes}")
    base.validate()
    _check_base(base)
    from imgflow.device import resolve_device

    resolve_device(base.device)  # --device cuda without CUDA: refused before the study exists
    space = parse_search(search, base)
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another path")
    return space


def _check_data(base: TrainConfig, progress: bool) -> None:
    """Load the data set once, so that a missing or unusable one is refused before the study
    exists. The trials read it from the cache this load fills."""
    load_run_data(base.to_dict(), progress=progress, remarks=True)


def open_storage(storage: str | None, out: Path, optuna):
    """The Optuna storage a study lives in.

    None: OUT/study.db (SQLite), for one worker. 'journal:PATH' or a PATH ending in .log: a journal
    file, for workers on one machine. A database URL (postgresql://, mysql://, sqlite:///): shared
    by workers on several machines (PostgreSQL or MySQL; SQLite locks under concurrent writers).
    """
    if storage is None:
        return f"sqlite:///{(out / STUDY_FILE).resolve()}"
    if "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except (ImportError, ModuleNotFoundError) as exc:
            raise UserError(f"--storage {_without_password(storage)} needs a database driver: {exc}") from None
        except Exception as exc:  # sqlalchemy's errors: no server, wrong password, unknown dialect
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot open --storage {_without_password(storage)}: {first}") from None
    path = _journal_path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = optuna.storages.journal
    backend = journal.JournalFileBackend if hasattr(journal, "JournalFileBackend") else journal.JournalFileStorage
    return optuna.storages.JournalStorage(backend(str(path)))


def _journal_path(storage: str) -> Path:
    """The file of a journal --storage; a UserError for what is neither a journal nor a URL."""
    path = storage.removeprefix("journal:")
    if not storage.startswith("journal:") and not path.endswith(".log"):
        raise UserError(f"--storage {storage}: give a journal file (journal:PATH or a path ending in .log) "
                        "or a database URL (postgresql://..., mysql://..., sqlite:///...)")
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"--storage {storage}: {path} is a directory: name the journal file in it")
    return path


def _without_password(url: str) -> str:
    """A database URL as it may be printed or recorded: its password, if any, replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _open_study(out: Path, base: TrainConfig, space: dict[str, Dimension], optuna, storage: str | None = None):
    """The study in its storage (OUT/study.db by default), created or continued, with a trial a
    gone worker left running queued again."""
    out.mkdir(parents=True, exist_ok=True)
    # Never judged in the first half of its epochs: there a one-cycle run is warming up or at its
    # peak learning rate, and its accuracy says little yet about where it ends (CIFAR-10, `fast`
    # preset, 2-epoch trials: validation 0.18 after epoch 1 became 0.38, 0.34 became 0.46).
    pruner = optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=base.epochs // 2 + 1)
    study = optuna.create_study(storage=open_storage(storage, out, optuna), study_name=STUDY_NAME,
                                direction="maximize", pruner=pruner, load_if_exists=True)
    if not study.trials:
        _enqueue_base(study, base, space)
    _requeue_interrupted(study, optuna)
    return study


def _next_trial(study, optuna, base: TrainConfig, space: dict[str, Dimension], out: Path, index: int,
                trials: int, progress: bool) -> bool:
    """Ask the study for a trial (sampler seeded by the trials before it), train it, tell the study
    how it ended. False when other workers took the last trials first (nothing was trained)."""
    study.sampler = _sampler(optuna, base, index)
    with _one_writer(out):  # no worker here sees the trial running before it names its worker
        trial = study.ask()
        trial.set_user_attr("worker", _worker())
    # Its place among the trials finished or running: unique while it runs, so is its directory.
    index = _claimed_count(study, optuna, below=trial.number)
    if index >= trials:  # another worker asked between our count and our ask
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    # TPE draws when the trial suggests its values, not at the ask: seeded again by the trial's place,
    # two workers that asked at once draw different values (one worker: the place it was asked at).
    study.sampler = _sampler(optuna, base, index)
    log.info("trial %d of %d", index + 1, trials)
    try:
        value = _run_trial(trial, optuna, base, space, out, index, progress)
    except KeyboardInterrupt:
        # The trial stays 'running' in the study; the next invocation queues it again.
        raise KeyboardInterrupt(f"trial {index + 1} saved a checkpoint; run the same 'imgflow tune' "
                                "command to continue the study") from None
    except optuna.TrialPruned as exc:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d pruned: %s", index + 1, exc)
    else:
        study.tell(trial, value)
        log.info("trial %d: validation accuracy %.4f with %s", index + 1, value, _params_text(trial.params))
    return True


def _sampler(optuna, base: TrainConfig, index: int):
    return optuna.samplers.TPESampler(seed=int(np.random.SeedSequence([base.seed, index]).generate_state(1)[0]),
                                      n_startup_trials=STARTUP_TRIALS)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _record(study, optuna, started: dict, trials: int) -> dict:
    """tune.json: the settings, every trial (in order), and the best one with the command to train it."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    rows = []
    for t in study.get_trials(deepcopy=False, states=done):
        last = max(t.intermediate_values) if t.intermediate_values else None
        params = t.user_attrs.get("trained", t.params)  # as trained, 3 significant digits
        rows.append({"number": len(rows), "state": t.state.name.lower(), "params": params,
                     "val_acc": t.value, "epochs_trained": last,
                     "curve": [t.intermediate_values[e] for e in sorted(t.intermediate_values)],
                     "run": t.user_attrs.get("run"), "base": t.user_attrs.get("base", False),
                     "diverged": t.user_attrs.get("diverged")})
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["val_acc"], default=None)
    record = {**started, "trials_planned": trials, "trials": rows, "best": None}
    if best is not None:
        config = _trial_config(TrainConfig.from_dict(started["base"]), best["params"])
        record["best"] = {**best, "command": train_command(config)}
    return record


def train_command(config: TrainConfig) -> str:
    """The `imgflow train` command that trains `config` (options that differ from the defaults)."""
    import shlex

    settings = {k: v for k, v in config.to_dict().items() if k in OPTION_OF and k != "model"}
    return " ".join(["imgflow", "train", shlex.quote(config.data), "--model", config.model,
                     *command_line_options(settings)])


def format_summary(record: dict) -> str:
    """The trials as a table, best last line: what `imgflow tune` prints."""
    lines = [f"{'trial':>5}  {'state':<8}  {'val acc':>7}  {'epochs':>6}  values"]
    for r in record["trials"]:
        acc = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "-"
        lines.append(f"{r['number'] + 1:>5}  {r['state']:<8}  {acc:>7}  {r['epochs_trained'] or '-':>6}  "
                     f"{_params_text(r['params'])}" + ("  (the base configuration)" if r.get("base") else ""))
    best = record.get("best")
    if best is None:
        lines.append("no trial finished: nothing to recommend")
    else:
        lines.append(f"best: trial {best['number'] + 1}, validation accuracy {best['val_acc']:.4f}")
        lines.append(f"train it: {best['command']}")
    return "\n".join(lines)
