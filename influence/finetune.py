"""Fine-tuning a backbone with its head for one target, as the works this project grew from do.

`finetune` trains torchvision's MobileNetV2 with a new linear head on the target's labelled
paintings in the run's one split (`models/split.parquet`, shared with every head, so no head's
held-out painting was a fine-tuning picture); labels with too few paintings are left out:

1. a linear probe: the head alone, fitted as a class-balanced logistic regression on the frozen
   backbone's pooled features (standardisation folded into the layer). Fine-tuning from a
   converged head distorts the pretrained features less than from a random one (LP-FT, Kumar et
   al. 2022), and it costs no training epochs: it reads the run's stored features of the same
   backbone and weights when there are some, else it takes one pass over the pictures;
2. the whole net, batch norms frozen, with lower learning rates for earlier layers (`LAYER_LR`),

with random crops and left-right flips as augmentation and class-balanced cross-entropy. Early
stopping watches accuracy on the split's validation part, else a seeded validation slice of the
training part (the held-out part is only used once, at the end). A checkpoint is written after
every epoch, so a killed run resumes at the next one; `budget_s` bounds the training time over all
resumptions. It runs on CUDA when there is a GPU, else on the CPU. Its starting weights are, unless
given, those the run's own frozen extractor of the same name used (`starting_weights`), else the
extractors' documented order; it never falls back to random ones. The best epoch's backbone is
saved as `models/<name>.pth`, its penultimate (pooled) features become the feature set
`<backbone>-ft-<target>`, and the network's own head is judged on the held-out part with the same
metrics as the other heads.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2 as T
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader, Dataset
from torchvision import models
from tqdm.auto import tqdm

from influence.combine import save_features
from influence.extract.reader import default_workers
from influence.extractors import RANDOM, get_extractor, load_checked, resolve_state_dict
from influence.extractors.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from influence.extractors.torchvision_cnn import imagenet_preprocess
from influence.images import open_rgb
from influence.runs import (
    InfluenceError,
    Run,
    Step,
    atomic,
    fingerprint,
    module_constants,
    read_json,
    versions,
    write_json,
)
from influence.train import MAX_ITER, SEED, VALIDATION_SIZE, C, as_target, evaluate, run_split

#: Version of this stage's recipe and of what it stores: bump it when a code change changes them.
VERSION = "2"
BACKBONES = ("mobilenet_v2",)
SIZE = 224
BATCH_SIZE = 32
#: Learning rate of the head in the whole-net phase; a block of `features` gets `HEAD_LR * factor`,
#: the factor of the last entry whose start is at most its index (earlier layers learn less). The
#: head starts converged (the probe), so these are ten times lower than a head trained from
#: scratch would want: with 1e-3 for the head and 1e-4 for the last blocks, style's validation
#: accuracy fell from the probe's 0.756 to 0.583 after the first whole-net epoch.
HEAD_LR = 1e-4
LAYER_LR = ((0, 0.03), (7, 0.1), (14, 0.3))
WEIGHT_DECAY = 1e-4
#: Random crops keep at least this share of the picture before resizing.
CROP_SCALE = (0.6, 1.0)
#: Whole-net epochs without a better validation accuracy than the phase's best before it stops.
#: Counted within the phase, not from the probe: its first epoch dips below the probe while the
#: net meets augmented crops (style 0.756 -> 0.719, genre 0.697 -> 0.660) and style needed a
#: second to pass it (0.774). The probe's weights are still kept if no epoch beats them.
PATIENCE = 2


class _Labelled(Dataset):
    """Paintings with their class index, decoded and transformed in loader workers."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, transform: Any) -> None:
        self.paths, self.labels, self.transform = list(paths), labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(open_rgb(self.paths[i])), int(self.labels[i])


def train_transform() -> T.Compose:
    """Augmentation: a random crop of most of the picture, a coin-flip mirror, ImageNet stats."""
    return T.Compose([T.ToImage(), T.RandomResizedCrop(SIZE, scale=CROP_SCALE, antialias=True),
                      T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def feature_set_name(backbone: str, target: str) -> str:
    return f"{backbone}-ft-{target}"


def paths_of(run: Run, backbone: str, target: str) -> dict[str, Path]:
    name = feature_set_name(backbone, target)
    return {"checkpoint": run.models_dir / f"{name}.checkpoint.pt",
            "weights": run.models_dir / f"{name}.pth", "report": run.models_dir / f"{name}.json"}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def starting_weights(run: Run, backbone: str) -> str | None:
    """The weights file the run's own `backbone` feature set was extracted with, if any: the
    fine-tuned net then starts from the very features its frozen heads are compared with."""
    if backbone not in run.feature_names():
        return None
    spec = run.features_info(backbone).get("config", {}).get("weights_spec")
    return spec if spec and spec != RANDOM else None


def stored_features(run: Run, catalog: pd.DataFrame, backbone: str, weights: str | None,
                    image_ids: pd.Series) -> np.ndarray | None:
    """The run's own `backbone` features of `image_ids` when they were made with `weights`: the
    probe then reads them instead of passing every picture through the frozen net again."""
    recorded = starting_weights(run, backbone)
    if weights is None or recorded is None or Path(weights).resolve() != Path(recorded).resolve():
        return None
    row = pd.Series(np.arange(len(catalog)), index=catalog["image_id"].to_numpy())
    return np.asarray(run.features(backbone)[row.loc[image_ids].to_numpy()], dtype=np.float32)


def build_model(backbone: str, weights: str | None, classes: int) -> tuple[torch.nn.Module, str]:
    """The backbone with its pretrained weights and a new `classes`-way head; and the weights.

    Unlike an extractor, it refuses to fall back to random weights: only `weights="random"`
    trains from scratch, which two CPU cores cannot do in any useful time."""
    if backbone not in BACKBONES:
        raise InfluenceError(f"cannot fine-tune '{backbone}' (backbones: {', '.join(BACKBONES)})")
    default = models.MobileNet_V2_Weights.DEFAULT
    state, used = resolve_state_dict(
        backbone, weights, lambda: default.get_state_dict(progress=True, check_hash=True),
        f"torchvision {default}")
    if state is None and weights != RANDOM:
        raise InfluenceError(f"no pretrained {backbone} weights to fine-tune: {used}; give "
                             f"--weights PATH (or --weights random to train from scratch)")
    model = models.mobilenet_v2(weights=None)
    load_checked(model, state, backbone)
    model.classifier[-1] = torch.nn.Linear(model.last_channel, classes)
    return model, used


def _train_mode(model: torch.nn.Module) -> None:
    """Training mode with every batch norm frozen (eval): the probe's head was fitted on features
    normalised by the pretrained statistics, and batch statistics of augmented painting crops moved
    them so far that style's validation accuracy fell from 0.756 to 0.636 in the first epoch. The
    norms' scale and shift still learn."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Every block learns, earlier ones slower than later ones and the head."""
    groups = [{"params": model.classifier.parameters(), "lr": HEAD_LR}]
    for i, block in enumerate(model.features):
        factor = [f for start, f in LAYER_LR if i >= start][-1]
        groups.append({"params": block.parameters(), "lr": HEAD_LR * factor})
    return torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)


def _pooled(model: torch.nn.Module, loader: DataLoader, dev: torch.device,
            progress: str | None = None) -> np.ndarray:
    """The backbone's pooled (penultimate) features of every picture the loader gives, with a
    progress bar titled `progress` if given."""
    model.eval()
    rows = []
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=progress, unit="batch", disable=progress is None,
                         leave=False):
            rows.append(model.features(x.to(dev)).mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(rows).astype(np.float32)


def _probe(model: torch.nn.Module, fit: tuple[np.ndarray, np.ndarray],
           val: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Set the head to a logistic regression fitted on frozen pooled features (x, class index);
    returns its training log-loss and validation accuracy."""
    (x_fit, y_fit), (x_val, y_val) = fit, val
    scaler = StandardScaler().fit(x_fit)
    probe = LogisticRegression(C=C, class_weight="balanced", max_iter=MAX_ITER,
                               random_state=SEED).fit(scaler.transform(x_fit), y_fit)
    layer = model.classifier[-1]
    weight = probe.coef_ / scaler.scale_
    with torch.no_grad():
        layer.weight[probe.classes_] = torch.as_tensor(weight, dtype=layer.weight.dtype)
        layer.bias[probe.classes_] = torch.as_tensor(probe.intercept_ - weight @ scaler.mean_,
                                                     dtype=layer.bias.dtype)
    loss = log_loss(y_fit, probe.predict_proba(scaler.transform(x_fit)), labels=probe.classes_)
    return float(loss), float((probe.predict(scaler.transform(x_val)) == y_val).mean())


def _predict(model: torch.nn.Module, loader: DataLoader, dev: torch.device) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for x, _ in loader:
            out.append(torch.softmax(model(x.to(dev)), dim=1).cpu().numpy())
    return np.concatenate(out)


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic(path) as tmp:
        torch.save(state, tmp)


def finetune(run: Run, target: str, backbone: str = "mobilenet_v2", weights: str | None = None,
             *, epochs: int = 10, budget_s: float | None = None,
             batch_size: int = BATCH_SIZE, workers: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or resume), judge on the held-out part, store the feature set; returns the
    report (also written to `models/<backbone>-ft-<target>.json`)."""
    if as_target(target).multi_label:
        raise InfluenceError(f"finetune learns one label per painting; '{target}' is multi-label")
    catalog = run.catalog()
    split, _ = run_split(run, target, catalog)
    if split.empty:
        raise InfluenceError(f"target '{target}' has too few labelled paintings to fine-tune on")
    classes = sorted(split["label"].unique())
    index = {c: i for i, c in enumerate(classes)}
    files = catalog.set_index("image_id")["file"]
    root = run.image_root()
    paths = np.asarray([root / f for f in files.loc[split["image_id"]]], dtype=object)
    y = split["label"].map(index).to_numpy()
    part = split["part"].to_numpy(dtype=object)
    train_rows, test_rows = np.flatnonzero(part == "train"), np.flatnonzero(part == "test")
    # The split's own validation part if it has one, else a seeded, stratified slice.
    fit_rows, val_rows = (
        (train_rows, np.flatnonzero(part == "validation")) if (part == "validation").any()
        else train_test_split(train_rows, test_size=VALIDATION_SIZE, random_state=SEED,
                              stratify=y[train_rows]))
    workers = default_workers() if workers is None else workers
    dev = device()
    torch.manual_seed(SEED)

    def loader(rows: np.ndarray, shuffle_seed: int | None = None) -> DataLoader:
        """Augmented and shuffled (seeded per epoch) when `shuffle_seed` is given."""
        train = shuffle_seed is not None
        transform = train_transform() if train else imagenet_preprocess()
        data = _Labelled(paths[rows], y[rows], transform)
        return DataLoader(data, batch_size=batch_size, shuffle=train, num_workers=workers,
                          generator=torch.Generator().manual_seed(shuffle_seed) if train else None)

    weights = weights or starting_weights(run, backbone)
    stored = stored_features(run, catalog, backbone, weights, split["image_id"])
    model, weights_used = build_model(backbone, weights, len(classes))
    model.to(dev)
    files_at = paths_of(run, backbone, target)
    config = {"target": target, "backbone": backbone, "weights": weights_used,
              "split": fingerprint(split["image_id"] + "\0" + split["part"]),
              "batch_size": batch_size, "head_lr": HEAD_LR, "layer_lr": LAYER_LR, "size": SIZE,
              "crop_scale": CROP_SCALE, "weight_decay": WEIGHT_DECAY, "seed": SEED,
              "probe_c": C, "batch_norm": "frozen"}
    name = feature_set_name(backbone, target)
    # Training resumes from its checkpoint inside the step: more epochs or a larger budget
    # change the key, so the step runs again and continues where the last one stopped.
    step = Step("finetune", name, {**config, "epochs": epochs, "budget_s": budget_s,
                                   "constants": module_constants(sys.modules[__name__])},
                VERSION, {"features": run.step_key("extract", backbone) if stored is not None
                          else None},
                (files_at["weights"], files_at["report"], run.features_dir / f"{name}.npy"))

    def build() -> dict[str, Any]:
        """Train (or resume), judge on the held-out part, store the feature set."""
        state: dict[str, Any] = {"config": config, "epoch": 0, "history": [], "elapsed_s": 0.0,
                                 "best": None}
        if files_at["checkpoint"].exists():
            saved = torch.load(files_at["checkpoint"], map_location="cpu", weights_only=False)
            if saved["config"] == config:
                state = saved
                model.load_state_dict(state["model"])
            else:
                print(f"{name}: configuration changed; starting again")
        balanced = compute_class_weight("balanced", classes=np.arange(len(classes)),
                                        y=y[train_rows])
        weight = torch.tensor(balanced, dtype=torch.float32, device=dev)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        budget = float("inf") if budget_s is None else budget_s
        stopped = ""
        while True:
            epoch = state["epoch"]
            full = [h["val_accuracy"] for h in state["history"] if h["phase"] == "full"]
            since_best = len(full) - 1 - int(np.argmax(full)) if full else 0
            if epoch >= 1 + epochs:
                stopped = "epochs done"
            elif since_best >= PATIENCE:
                stopped = f"no better validation accuracy for {PATIENCE} epochs"
            elif state["elapsed_s"] >= budget:
                stopped = "time budget spent"
            if stopped:
                break
            start = time.perf_counter()
            if epoch == 0:
                phase, batches = "probe", 0
                if stored is not None:
                    frozen = {"fit": stored[fit_rows], "val": stored[val_rows]}
                else:
                    shown = "probe: frozen features" if progress else None
                    frozen = {"fit": _pooled(model, loader(fit_rows), dev, shown),
                              "val": _pooled(model, loader(val_rows), dev, shown)}
                loss, accuracy = _probe(model, (frozen["fit"], y[fit_rows]),
                                        (frozen["val"], y[val_rows]))
            else:
                phase, losses = "full", []
                # Seeded per epoch (augmentation, dropout): a run resumed after a kill between
                # epochs learns exactly what an uninterrupted one does.
                torch.manual_seed(SEED + epoch)
                _train_mode(model)
                optimizer = _optimizer(model)
                if state.get("optimizer"):
                    optimizer.load_state_dict(state["optimizer"])
                for x, labels in tqdm(loader(fit_rows, SEED + epoch), desc=f"epoch {epoch + 1}",
                                      unit="batch", disable=not progress, leave=False):
                    optimizer.zero_grad()
                    batch_loss = loss_fn(model(x.to(dev)), labels.to(dev))
                    batch_loss.backward()
                    optimizer.step()
                    losses.append(batch_loss.item())
                    if state["elapsed_s"] + time.perf_counter() - start >= budget:
                        break
                loss, batches = float(np.mean(losses)), len(losses)
                state["optimizer"] = optimizer.state_dict()
                proba = _predict(model, loader(val_rows), dev)
                accuracy = float((proba.argmax(axis=1) == y[val_rows]).mean())
            seconds = time.perf_counter() - start
            state["epoch"] = epoch + 1
            state["elapsed_s"] += seconds
            state["history"].append({"epoch": epoch + 1, "phase": phase, "loss": round(loss, 4),
                                     "batches": batches, "val_accuracy": round(accuracy, 4),
                                     "seconds": round(seconds, 1)})
            if state["best"] is None or accuracy > state["best"]["val_accuracy"]:
                state["best"] = {"epoch": epoch + 1, "val_accuracy": accuracy,
                                 "model": {k: v.detach().cpu().clone()
                                           for k, v in model.state_dict().items()}}
            state["model"] = model.state_dict()
            _save(files_at["checkpoint"], state)
            print(f"epoch {epoch + 1} ({phase}): loss {loss:.3f}, validation accuracy "
                  f"{accuracy:.3f}, {seconds:.0f} s", flush=True)
        model.load_state_dict(state["best"]["model"])
        proba = _predict(model, loader(test_rows), dev)
        labels = np.asarray(classes, dtype=object)
        metrics, _, _ = evaluate(labels[y[test_rows]], proba, classes)
        backbone_state = {k: v.cpu() for k, v in model.state_dict().items()
                          if not k.startswith("classifier.")}
        _save(files_at["weights"], backbone_state)
        every = catalog["file"].map(run.image_path).to_numpy(dtype=object)
        # Stored with the preprocessing a query with these weights gets (their weights record),
        # so a painting's stored row and its query embedding agree.
        query_preprocess = get_extractor(backbone, str(files_at["weights"])).preprocess
        features = extract(run, name, target, model, backbone, files_at["weights"], step.key,
                           DataLoader(_Labelled(every, np.zeros(len(every), dtype=int),
                                                query_preprocess),
                                      batch_size=batch_size, num_workers=workers), dev, progress)
        report = {"target": target, "features": name, "head": "fine-tuned network", **metrics,
                  "n_train": int(len(fit_rows)), "n_validation": int(len(val_rows)),
                  "classes": classes, "backbone": backbone, "weights": weights_used,
                  "device": str(dev), "stopped": stopped,
                  "probe_features": (f"the run's stored {backbone} features" if stored is not None
                                     else "computed by the frozen net"),
                  "best_epoch": state["best"]["epoch"],
                  "best_val_accuracy": round(state["best"]["val_accuracy"], 4),
                  "history": state["history"], "training_s": round(state["elapsed_s"], 1),
                  "budget_s": budget_s, "torch_threads": torch.get_num_threads(),
                  "feature_set": {"dim": features["dim"], "rows": features["rows"]},
                  "config": config, "input": step.key, "versions": versions()}
        write_json(files_at["report"], report)
        return {k: report[k] for k in ("accuracy", "best_epoch", "stopped", "training_s")}

    result = run.step(step, build)
    return {**read_json(files_at["report"]), "up_to_date": result["up_to_date"]}


def extract(run: Run, name: str, target: str, model: torch.nn.Module, backbone: str,
            weights: Path, key: str, loader: Any, dev: torch.device, progress: bool = True
            ) -> dict[str, Any]:
    """Store the fine-tuned backbone's pooled features of every painting as feature set `name`,
    recorded as an extraction step so later stages see when it changes, and with the `target`
    whose training part it learnt from (`fine_tuned_on`: heads of other targets check it)."""
    catalog = run.catalog()
    config = {"extractor": backbone, "weights_spec": str(weights)}
    step = Step("extract", name, config, f"finetune-{VERSION}", {"weights": key},
                (run.features_dir / f"{name}.npy", run.features_dir / f"{name}.json", weights))

    def build() -> dict[str, Any]:
        x = _pooled(model, loader, dev, f"extract {name}" if progress else None)
        info = {"extractor": backbone, "dim": int(x.shape[1]), "weights": f"file {weights}",
                "preprocessing": repr(loader.dataset.transform), "config": config,
                "catalog": fingerprint(catalog["image_id"].tolist()), "rows": len(x),
                "finetuned": key, "fine_tuned_on": target, "versions": versions()}

        def fill(out: np.ndarray) -> None:
            out[:] = x

        save_features(run, name, len(x), x.shape[1], fill, info)
        return {"dim": int(x.shape[1]), "rows": len(x)}

    run.step(step, build)
    return run.features_info(name)
