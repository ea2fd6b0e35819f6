"""search: a hyperparameter search that picks each trial from the results so far (Optuna), every trial a DVC
experiment.

    python -m tools.search search.yaml          # runs the study's trials until it has n_trials; again: resumes

SEARCH.yaml names the study, how many trials it has, what it minimizes or maximizes, the params it searches
and the params it sets for every trial (see search.yaml, the README's example):

    study: lr                        # its trials are the experiments lr-0, lr-1, ...; a git ref's characters
    n_trials: 6
    objective: {metric: details/train_cpu.json:final_val_loss, direction: minimize}
    fixed: {train.validation_split: 0.1}                        # every trial: dotted keys of params.yaml
    space:                                                      # Optuna's distributions, by dotted key
      train.learning_rate: {low: 0.0002, high: 0.01, log: true} # a float, log-uniform; two ints: an int
      train.batch_size: {choices: [64, 128]}                    # one of these
    baseline: true                   # trial 0: params.yaml's own values of the space (then: better than them?)
    seed: 0                          # Optuna's sampler (TPE), so the same results give the same next trial

Each trial is `dvc exp run -n <study>-<number> -S key=value ...` in the workspace, from the commit (the files
git tracks are put back before each trial and after the last; the search refuses to start on other changes):
DVC records its params, metrics and outputs as any experiment, `dvc exp show` and `python -m tools.experiments`
list it, its stages' results go to the run cache (a trial of params already run restores instead of training),
and `dvc exp apply <name>` puts the best one in the workspace. The objective is read from the trial's file
(`FILE:dotted.key`), in the workspace once the trial has run: choose on validation (train.validation_split > 0,
details/train_<device>.json's final_val_loss), not on the test set, which would then no longer measure the
chosen model. Optuna's journal, `.search/<study>.jsonl`, holds the study: run the command again after a kill
or a crash, and it resumes (a trial that was cut short runs again with the same params, first). A trial
whose run fails (a diverged loss, say) is a failed trial, counted in n_trials; the search goes on, and exits 1
at the end naming each. Not a pipeline stage: a tool over DVC.
"""

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from mnist_cnn.dvc_commands import (back_to_the_commit, changed_files, dvc, is_ref_name, lock_outs, reason, run_shown,
                                    value_text)
from mnist_cnn.errors import UserError, printable
from mnist_cnn.files import read_json
from mnist_cnn.params import PARAMS_FILE, check_sections, dotted_get, read_yaml, validate, with_settings
from mnist_cnn.stage import run

JOURNALS = Path(".search")
METRIC = re.compile(r"^(?P<file>[^:]+\.json):(?P<key>[A-Za-z0-9_.]+)$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Objective(Strict):
    metric: str = Field(pattern=METRIC.pattern)
    direction: Literal["minimize", "maximize"]


class Range(Strict):
    low: StrictInt | StrictFloat  # two ints (1, 3): an int param; a float on either end (0.5, 3.0): a float
    high: StrictInt | StrictFloat
    log: bool = False


class Choices(Strict):
    choices: list[str | int | float | bool] = Field(min_length=1)


class SearchFile(Strict):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
    n_trials: int = Field(ge=1, le=10_000)
    objective: Objective
    space: dict[str, Range | Choices] = Field(min_length=1)
    fixed: dict[str, str | int | float | bool | list | None] = {}
    baseline: bool = True
    startup_trials: int = Field(default=3, ge=0)  # random trials (the baseline counts) before TPE chooses
    seed: int = 0


def distributions(space):
    """Optuna's distribution per dotted key: choices; a range of two ints (not log-scaled floats) an int."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    made = {}
    for key, entry in space.items():
        if isinstance(entry, Choices):
            made[key] = CategoricalDistribution(entry.choices)
            continue
        if not entry.low < entry.high or (entry.log and entry.low <= 0):
            raise UserError(f"search file: space.{key}: needs low < high{' and low > 0 (log)' if entry.log else ''}")
        whole = isinstance(entry.low, int) and isinstance(entry.high, int)
        made[key] = (IntDistribution(entry.low, entry.high, log=entry.log) if whole
                     else FloatDistribution(float(entry.low), float(entry.high), log=entry.log))
    return made


def read_search(path, params):
    """The search file, checked: its fields, and each key of space and fixed a key of params.yaml, with the
    params of a trial (fixed, and any point of the space: its ends, each choice) valid. Returns the file and
    Optuna's distributions."""
    spec = validate(read_yaml(path), SearchFile, "search", path=str(path))
    if not is_ref_name(spec.study):
        raise UserError(f"{path}: study {spec.study!r} must be a git ref's last part (letters, digits, . - _)")
    dists = distributions(spec.space)
    both = set(spec.space) & set(spec.fixed)
    if both:
        raise UserError(f"{path}: {', '.join(sorted(both))} both fixed and searched; keep one")
    base = with_settings(params, spec.fixed, f"{path} (fixed)")
    for key, dist in dists.items():
        ends = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)
        for value in ends:
            check_sections(with_settings(base, {key: value}, f"{path} (space)"), f"{path}: space.{key} = {value!r}")
    return spec, dists


def baseline_params(params, spec, dists, path):
    """params.yaml's values of the searched keys, to run first: each must lie in its distribution."""
    values = {key: dotted_get(params, key) for key in spec.space}
    for key, value in values.items():
        dist = dists[key]
        inside = (value in dist.choices if hasattr(dist, "choices")
                  else isinstance(value, int | float) and dist.low <= value <= dist.high)
        if not inside:
            raise UserError(f"{path}: baseline: true, but {PARAMS_FILE}'s {key} = {value!r} is outside the space; "
                            f"widen it or set baseline: false")
    return values


def objective_value(metric):
    """The number `FILE:dotted.key` names in the workspace; a UserError when absent or not finite."""
    found = METRIC.match(metric)
    data = read_json(found["file"])
    try:
        value = dotted_get(data, found["key"])
    except (KeyError, TypeError):
        raise UserError(f"{found['file']} has no {found['key']} (the objective); is train.validation_split > 0 "
                        f"for a val_ metric?") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{metric} = {printable(value)!r} is not a finite number")
    return float(value)


def counted(trials):
    """The trials that count toward n_trials: finished ones, less those cut short and run again."""
    from optuna.trial import TrialState

    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t.number not in rerun]


def resume(study):
    """Trials left RUNNING by a search that was killed: their params queued to run first again (a baseline stays
    the baseline), then the cut trials marked failed (not counted: counted() skips a trial run again)."""
    from optuna.trial import TrialState

    cut = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in cut:
        again = {"rerun_of": trial.number, **({"baseline": True} if trial.user_attrs.get("baseline") else {})}
        study.enqueue_trial(trial.params, user_attrs=again)
        study.tell(trial.number, state=TrialState.FAIL)
        print(f"{trial.user_attrs.get('experiment', trial.number)}: cut short by the last search; runs again",
              flush=True)
    return len(cut)


def leftovers_of_a_trial(changed, lock_outs, params=True):
    """Whether uncommitted changes are only what a `dvc exp run` writes: params.yaml (unless params=False),
    dvc.lock and the outputs git tracks (metrics, plots, the report)."""
    written = {"dvc.lock", *lock_outs} | ({PARAMS_FILE} if params else set())
    return all(path in written or any(path.startswith(out.rstrip("/") + "/") for out in lock_outs)
               for path in changed)


def git_outs():
    """The output paths the committed dvc.lock names (those in git among them are what a trial rewrites)."""
    return list(lock_outs(subprocess.run(["git", "show", "HEAD:dvc.lock"], capture_output=True, text=True).stdout))


def summary(study, direction):
    """The trials, best first: name, state, value, params."""
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    done.sort(key=lambda t: t.value, reverse=direction == "maximize")
    lines = [f"{t.user_attrs.get('experiment', t.number)}: {t.value:.5g}  "
             + settings_text(t.params)
             + ("  (params.yaml's)" if t.user_attrs.get("baseline") else "") for t in done]
    failed = [t for t in study.trials if t.state == TrialState.FAIL and "reason" in t.user_attrs]
    return lines, done[0] if done else None, failed


def taken_names():
    """The experiments of this commit, by name (`dvc exp list`)."""
    return set(dvc("exp", "list", "--name-only").stdout.split())


def checkout_outputs():
    """The committed run's DVC outputs back in the workspace (models/, details/ ...), which the last trial's
    left; a line saying so where DVC's cache lacks them."""
    if dvc("checkout", check=False).returncode != 0:
        print("note: the workspace's DVC outputs are still the last trial's; `dvc checkout` puts the committed "
              "run's back once they are in the cache (`dvc pull`), or `dvc repro` makes them", flush=True)


def settings_text(params):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def open_study(journal, spec, head):
    """The study of the journal (a new one where there is none), and how many trials it held. A journal begun
    from another search file (objective, space, fixed params, sampler) or another commit is refused: its trials
    would not be comparable with the new ones."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fingerprint = spec.model_dump_json(exclude={"n_trials"})
    storage = JournalStorage(JournalFileBackend(str(journal)))
    try:
        held = optuna.load_study(study_name=spec.study, storage=storage)
    except KeyError:  # no such study yet
        held = None
    if held is not None:
        for what, mine, theirs in (("search file", fingerprint, held.user_attrs.get("search")),
                                   ("commit", head, held.user_attrs.get("commit"))):
            if mine != theirs:
                raise UserError(f"the study {spec.study!r} in {journal} began with another {what} "
                                f"({'its settings' if what == 'search file' else str(theirs)[:7]}): its trials "
                                f"would not compare with new ones; name another study (or delete the journal)")
    count = len(held.trials) if held is not None else 0
    # The sampler's seed moves on with the trials held: a resumed search does not draw the same random points
    # again, and the same journal gives the same next trial.
    sampler = optuna.samplers.TPESampler(seed=spec.seed + count, n_startup_trials=spec.startup_trials)
    study = optuna.create_study(study_name=spec.study, storage=storage, load_if_exists=True,
                                direction=spec.objective.direction, sampler=sampler)
    if held is None:
        study.set_user_attr("search", fingerprint)
        study.set_user_attr("commit", head)
    return study


def main(argv=None):
    import optuna

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("search", type=Path, help="the search's YAML file (search.yaml)")
    args = parser.parse_args(argv)
    params = read_yaml(Path(PARAMS_FILE))
    spec, dists = read_search(args.search, params)
    baseline = baseline_params(params, spec, dists, args.search) if spec.baseline else None
    changed = changed_files()
    if changed is None:
        raise UserError("not in a git clone: run the search in the project's clone (each trial is a git experiment)")
    outs = git_outs()
    objective_file = METRIC.match(spec.objective.metric)["file"]
    if objective_file not in outs:
        raise UserError(f"{args.search}: objective.metric's file {objective_file} is not an output of the committed "
                        f"pipeline (dvc.lock): a trial would not write it")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    journal = JOURNALS / f"{spec.study}.jsonl"
    from optuna.trial import TrialState

    held = journal.is_file()
    study = open_study(journal, spec, head) if held else None
    cut = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if study else []
    # A run's own products (dvc.lock, metrics, the report: a fresh `dvc repro` changes them, its fit time if
    # nothing else) are put back to the commit's, their outputs staying in DVC's cache; params.yaml and code
    # edits are the user's, kept: only a trial cut short leaves params.yaml changed.
    if changed and not leftovers_of_a_trial(changed, outs, params=bool(cut)):
        raise UserError(f"{len(changed)} file(s) differ from the commit ({', '.join(changed[:3])}): each trial "
                        f"starts from the commit, which the search puts back; commit them, or `git stash`")
    ours = {t.user_attrs.get("experiment") for t in study.trials} if study else set()
    clash = sorted(name for name in taken_names() - ours if re.fullmatch(rf"{re.escape(spec.study)}-\d+", name))
    if clash:
        raise UserError(f"experiments named like this study's trials exist already ({', '.join(clash[:3])}): "
                        f"`dvc exp remove {' '.join(clash)}`, or name another study")
    if changed and not cut:
        print(f"note: the workspace's run ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}) is put "
              f"back to the commit's for the search; its outputs stay in DVC's cache", flush=True)
    JOURNALS.mkdir(exist_ok=True)
    study = study or open_study(journal, spec, head)
    resume(study)
    if baseline and not study.trials:
        study.enqueue_trial(baseline, user_attrs={"baseline": True})
    print(f"study {spec.study}: {len(counted(study.trials))} of {spec.n_trials} trials done; "
          f"{spec.objective.direction} {spec.objective.metric} (journal {journal})", flush=True)
    ran = bool(cut)
    while len(counted(study.trials)) < spec.n_trials:
        trial = study.ask(dists)
        name = f"{spec.study}-{trial.number}"
        trial.set_user_attr("experiment", name)
        sets = {**spec.fixed, **trial.params}
        back_to_the_commit()  # not the last trial's params
        ran = True
        start = time.perf_counter()
        code, output = run_shown("exp", "run", "-n", name,
                                 *[w for key, value in sets.items() for w in ("-S", f"{key}={value_text(value)}")])
        try:
            if code != 0:
                raise UserError(reason(output).removeprefix("error: "))
            value = objective_value(spec.objective.metric)
        except UserError as err:
            trial.set_user_attr("reason", str(err))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"{name} ({settings_text(trial.params)}): failed: {err}", flush=True)
            continue
        study.tell(trial, value)
        best = study.best_trial
        print(f"{name} ({settings_text(trial.params)}): {spec.objective.metric} = {value:.5g} in "
              f"{time.perf_counter() - start:.0f} s; best so far: {best.user_attrs['experiment']} ({best.value:.5g})",
              flush=True)
    if ran:
        back_to_the_commit()
        checkout_outputs()
    lines, best, failed = summary(study, spec.objective.direction)
    print(f"study {spec.study}, {spec.objective.direction} {spec.objective.metric}, best first:")
    print("\n".join(f"  {line}" for line in lines) or "  no trial finished")
    if best is not None:
        print(f"best: {best.user_attrs['experiment']}; `dvc exp apply {best.user_attrs['experiment']}` puts it in "
              f"the workspace, `dvc exp show` lists every trial")
    if failed:
        sys.exit("error: " + "\nerror: ".join(f"{t.user_attrs.get('experiment')}: {t.user_attrs['reason']}"
                                              for t in failed))


if __name__ == "__main__":
    run(main)
