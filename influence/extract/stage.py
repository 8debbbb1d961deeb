"""The extract stage through the run protocol: steps, one plan, a distributor, finalize.

`extract_many` brings several feature sets up to date at once (one read of each partition feeds
them all), `extract_features` one. Sets whose step is done are left alone; the rest are planned
together, run by the engine's distributor, and each is finalized and recorded on its own, so one
set's failure (images unreadable since cataloguing, listed with reasons) does not lose another's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from influence.extract.distributor import LocalDistributor, Outcome
from influence.extract.plan import PART_SIZE, Plan, extraction_step, plan_extraction
from influence.extract.reader import default_workers
from influence.extract.store import FeatureStore
from influence.runs import InfluenceError, Run, fingerprint, write_json

ENGINES = ("local", "ray")


def finalize(plan: Plan, name: str, outcome: Outcome, engine: str) -> dict[str, Any]:
    """List the set's unreadable images, gather its parts into the aligned matrix and describe
    it; returns what the step records. Unreadable images are an error (after they are listed)."""
    store = FeatureStore(plan.run, name)
    wanted = set(plan.pending[name])
    # In catalog order, whatever order the partitions finished in.
    errors = {i: outcome.errors[i] for i in plan.files if i in wanted and i in outcome.errors}
    store.write_rejected(errors, plan.files)
    if errors:
        listed = "; ".join(f"{i}: {e}" for i, e in list(errors.items())[:3])
        raise InfluenceError(f"{name}: {len(errors)} images changed since cataloguing and "
                             f"could not be read ({listed}; all in {store.rejected_path}); run "
                             "extract again to re-catalog them")
    extractor = plan.extractors[name]
    weights = store.gather([it.image_id for it in plan.items], extractor.dim)
    if weights:
        extractor.weights_used = weights[0]
    info = {**extractor.info(), "config": {"extractor": name, "weights_spec": plan.weights[name]},
            "catalog": fingerprint(it.image_id for it in plan.items), "rows": len(plan.items),
            "new_rows": len(plan.pending[name]), "engine": engine,
            "timings": outcome.timings[name].as_dict()}
    write_json(store.info_path, info)
    return {k: info[k] for k in ("dim", "weights", "rows", "new_rows", "engine", "timings")}


def _distributor(engine: str, workers: int | None, processes: int | None,
                 ray: Mapping[str, Any] | None) -> Any:
    """The engine's distributor; the Ray one is imported only when asked for (it needs Ray)."""
    if engine == "ray":
        from influence.extract.ray_distributor import RayDistributor, RayOptions

        return RayDistributor(RayOptions(**(ray or {})))
    return LocalDistributor(workers, processes)


def extract_many(run: Run, names: Sequence[str], weights: Mapping[str, str | None] | None = None,
                 *, engine: str = "local", workers: int | None = None,
                 processes: int | None = None, progress: bool = True,
                 part_size: int = PART_SIZE, ray: Mapping[str, Any] | None = None
                 ) -> dict[str, dict[str, Any] | InfluenceError]:
    """Bring features/<name> up to date for every name; returns each step's report, or the
    error that stopped that set.

    `engine` is "local" (this process, or `processes` runner processes beside it) or "ray" (a
    pool of Ray actors; `ray` holds `RayOptions` fields). Both run the same runner on the same
    partitions.
    """
    if engine not in ENGINES:
        raise InfluenceError(f"unknown engine '{engine}' (available: {', '.join(ENGINES)})")
    weights = dict(weights or {})
    reports: dict[str, dict[str, Any] | InfluenceError] = {}
    steps, decisions = {}, {}
    for name in names:
        try:
            step = extraction_step(run, name, weights.get(name))
        except InfluenceError as e:
            reports[name] = e
            continue
        # The run protocol decides; a set that extends (or has no fit) extracts only the
        # images it lacks, one it refits starts again from its fit.
        decision = run.decide(step)
        if decision.action == "keep":
            reports[name] = {**run.step_record(step.stage, step.name), "up_to_date": True}
            continue
        if decision.refit:
            FeatureStore(run, name).reset(f"refitting its fit ({decision.why})")
        run.forget(step)
        steps[name], decisions[name] = step, decision
    if not steps:
        return reports
    start = time.perf_counter()
    distributor = _distributor(engine, workers, processes, ray)
    try:
        plan = plan_extraction(run, steps, {n: weights.get(n) for n in steps},
                               workers=default_workers() if workers is None else workers,
                               part_size=part_size, min_partitions=distributor.min_partitions,
                               progress=progress)
        outcome = distributor(plan, progress)
    except InfluenceError as e:
        return {**reports, **dict.fromkeys(steps, e)}
    for name, step in steps.items():
        try:
            result = finalize(plan, name, outcome, engine)
        except InfluenceError as e:
            reports[name] = e
            continue
        record = run.record(step, decisions[name], **result,
                            seconds=round(time.perf_counter() - start, 2))
        reports[name] = {**record, "up_to_date": False}
    return {n: reports[n] for n in names}


def extract_features(run: Run, name: str, weights: str | None = None, *, engine: str = "local",
                     workers: int | None = None, progress: bool = True,
                     part_size: int = PART_SIZE, ray: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Bring one feature set up to date (see `extract_many`); its report, or its error raised."""
    report = extract_many(run, [name], {name: weights}, engine=engine, workers=workers,
                          progress=progress, part_size=part_size, ray=ray)[name]
    if isinstance(report, InfluenceError):
        raise report
    return report
