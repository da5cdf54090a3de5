"""The fitted heads of a study's best trials, kept so that the test split is scored with the very
head that was selected, never a retrained one.

A study scores the test split once, for its best trial (and, for an experiment that compares
groups such as pooling types, for the best trial of each group). Retraining that trial to do so
costs a whole fit again (a 40-epoch pool5 head at batch 8: about 7 minutes on 2 cores) and,
for a tuning trial, would train another model than the one chosen unless its tuning settings are
applied. So when a trial completes as the best so far (overall, or within its group), its head is
pickled under the feature cache (``<cache>/heads/<parent run id>/trial-<n>.pkl``, written to a
temporary file and renamed) and the trial records the file and its sha256 (user attribute
``kept_head``); heads of completed trials that are no longer the best of anything are removed.
A head is small beside the features (an SVM on pool5: 1.5 MB; the pool5 mlp head: 105 MB against
450 MB of pool5 features). Only where the file is not there (another machine's worker, a removed
cache) is the trial refitted, and the summary says so.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import optuna
from optuna.trial import FrozenTrial, TrialState
from sklearn.base import BaseEstimator

from ..compute.heads import load_head, save_head
from .trials import best_per_group, pareto_optimal

USER_ATTR_KEPT_HEAD = "kept_head"  # {"path": ..., "sha256": ...}


def heads_folder(cache_path: Path, parent_run_id: str) -> Path:
    return Path(cache_path) / "heads" / parent_run_id


def needed(trials: list, directions, group_key: str | None) -> set[int]:
    """Numbers of the complete, feasible trials that are the best overall or of their group;
    among equal values the first (``best_per_group``'s rule, which the summary follows). With
    several objectives: every Pareto-optimal trial (any of them may be registered)."""
    directions = [directions] if isinstance(directions, str) else list(directions)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE and t.values is not None),
                      key=lambda t: t.number)
    if len(directions) > 1:
        return {t.number for t in pareto_optimal(complete, directions)}
    best = best_per_group(complete, None, directions[0])
    keep = {best["best"].number} if best else set()
    if group_key:
        keep |= {t.number for t in best_per_group(complete, group_key, directions[0]).values()}
    return keep


def keep_if_best(trial: optuna.Trial, values: list[float], head: BaseEstimator, folder: Path, directions,
                 group_key: str | None = None, constraints: dict[str, float] | None = None) -> bool:
    """Keep ``head`` when the trial (completing with ``values``, one per objective, meeting
    ``constraints``) is the best so far, overall or in its group of ``group_key``, or on the
    Pareto front; remove the heads of complete trials that no longer are.

    Returns:
        Whether the head was kept.
    """
    others = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.number != trial.number]
    this = SimpleNamespace(number=trial.number, state=TrialState.COMPLETE, values=list(values), params=trial.params,
                           constraints=dict(constraints or {}))
    keep = needed([*others, this], directions, group_key)
    if trial.number not in keep:
        return False
    path = folder / f"trial-{trial.number}.pkl"
    trial.set_user_attr(USER_ATTR_KEPT_HEAD, {"path": str(path), "sha256": save_head(head, path)})
    # Trials still running elsewhere are not complete: their files (when they come) are theirs.
    for other in others:
        if other.number not in keep:
            with contextlib.suppress(OSError):
                (folder / f"trial-{other.number}.pkl").unlink(missing_ok=True)
    return True


def kept_head(trial: FrozenTrial) -> tuple[BaseEstimator | None, str]:
    """The trial's kept head, or None with why it is not available."""
    record = trial.user_attrs.get(USER_ATTR_KEPT_HEAD)
    if not isinstance(record, dict) or "path" not in record:
        return None, "its head was not kept (it was not the best when it completed, or it ran before heads were kept)"
    return load_head(Path(record["path"]), record.get("sha256", ""))
