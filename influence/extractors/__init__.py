"""Feature extractors: one small interface, a registry, and one file per extractor.

An extractor declares on its class what the engine and the run protocol need: `version` (bump it
when a code change changes the features: the run protocol then extracts again), `cost` (ms per
one-image query on two cores; search defaults to the cheaper of near-equal feature sets),
`batch_size`, and `fit_sample` for extractors with `needs_fit` (PCA, kernel PCA), which learn from
a seeded sample of at most that many images first. Its `preprocess` (a picklable callable, PIL
image -> array) is known without loading the model, so reader workers and a cluster's nodes can
run it; `load` loads the model once per worker, `transform` turns a batch into float32 rows.
Weights are found in one order for every extractor (`locate_weights`), and described as data: an
extractor lists its `weights_records` (`Weights`: source, checksum, preprocessing, dim, metadata;
the first is the default), and its preprocessing and dim are its record's, whichever road the file
took (see `influence.extractors.weights`). Every module in this
package is imported on first use, so adding an extractor is adding a file with a class decorated
by `@register`. A family of models from one library (`timm`, `open_clip`)
registers once with `@register_family`; its extractors are named `family:model[:tag]`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from PIL import Image

from influence.extractors.weights import Weights, cache_dir, keep_in_cache, recognise
from influence.runs import InfluenceError, fingerprint

if TYPE_CHECKING:
    import torch

_REGISTRY: dict[str, type[Extractor]] = {}
_FAMILIES: dict[str, Any] = {}
FAMILY_SEP = ":"
RANDOM = "random"


class Extractor(ABC):
    """Turns images into feature vectors. Subclasses set `name` and implement the abstract parts."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: Bump when a code change changes the features; the run protocol then extracts again.
    version: ClassVar[str] = "1"
    #: Milliseconds per one-image query on two cores (search prefers the cheaper of equals).
    cost: ClassVar[float] = 100.0
    needs_fit: ClassVar[bool] = False
    #: At most this many images are used for fitting (`needs_fit` extractors).
    fit_sample: ClassVar[int] = 0
    #: Rows per model call; the engine batches reader output to this size.
    batch_size: ClassVar[int] = 32
    #: True if `preprocess` output is a few KB: the thumbnails' decoding pass then keeps it, and
    #: the local engine reads it instead of decoding every image again.
    cache_decoded: ClassVar[bool] = False
    #: File suffix of a weights file in `weights_dir()` (`<name><suffix>`).
    weights_suffix: ClassVar[str] = ".pth"
    #: The weights this extractor knows, the default first (empty: it learns or has no weights).
    weights_records: ClassVar[tuple[Weights, ...]] = ()
    #: True for conv nets run through `optimize`: the machine's `fast_path` is then part of
    #: how the features were made (in the step's key and the features' description).
    uses_fast_path: ClassVar[bool] = False

    def __init__(self, weights: str | None = None) -> None:
        self.weights = weights
        self.weights_used: str = "none (no learned weights)"
        #: How many images this instance will embed, where the engine knows (None: many, or a
        #: query): a conv net with fewer than FEW_IMAGES runs its ONNX copy (`runtime`).
        self.images: int | None = None

    def located_weights(self) -> Path | str | None:
        """The weights this extractor will load (see `locate_weights`), without loading them."""
        return locate_weights(self.name, self.weights, self.weights_suffix)

    def weights_record(self) -> Weights | None:
        """The record of the weights this extractor will load, without loading them.

        A file is recognised by its checksum (a local copy of torchvision's file has the
        download's record, hence its preprocessing); 'random' keeps the default's preprocessing.
        """
        if not self.weights_records:
            return None
        located = self.located_weights()
        default = self.weights_records[0]
        if located == RANDOM:
            return Weights("random", RANDOM, None, default.transforms, default.dim,
                           {"preprocessing_of": default.name})
        if isinstance(located, Path):
            return recognise(located, self.weights_records)
        return default

    def code_version(self) -> str:
        """What of the code shapes the features: the class's version, its weights record (or its
        preprocessing, where it has none) and, for conv nets, the machine's fast path."""
        record = self.weights_record()
        shape = repr(sorted(record.describe().items())) if record else repr(self.preprocess)
        made = f"{type(self).__module__}.{type(self).__name__} v{self.version}; {shape}"
        return f"{made}; {fast_path()}" if self.uses_fast_path else made

    @property
    def preprocess(self) -> Callable[[Image.Image], np.ndarray | torch.Tensor]:
        """The image -> array step (the weights record's), picklable so it can run in reader
        worker processes; extractors without records override it."""
        record = self.weights_record()
        if record is None:
            raise NotImplementedError(f"{self.name} declares neither weights nor preprocessing")
        return record.transforms

    @property
    def dim(self) -> int:
        """Length of one feature vector (the weights record's)."""
        record = self.weights_record()
        if record is None:
            raise NotImplementedError(f"{self.name} declares neither weights nor a dim")
        return record.dim

    def load(self) -> Extractor:
        """Load the model once, before the first transform; returns self."""
        return self

    def fit(self, batches: Iterable[np.ndarray | torch.Tensor]) -> Extractor:
        """Learn from preprocessed batches (only for `needs_fit` extractors); returns self."""
        return self

    @abstractmethod
    def transform(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Feature rows (float32, shape (len(batch), dim)) for a batch of preprocessed images."""

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """Features for RGB images in memory: the query path, with the same preprocessing."""
        return self.transform(stack([self.preprocess(im) for im in images]))

    def state(self) -> dict[str, Any] | None:
        """What a fitted extractor learned, to be saved with the features (None if nothing)."""
        return None

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` returned."""
        raise NotImplementedError(f"{self.name} has no fitted state")

    def info(self) -> dict[str, Any]:
        """How the features were made, recorded beside them."""
        record = self.weights_record()
        info = {"extractor": self.name, "dim": self.dim, "weights": self.weights_used,
                "preprocessing": repr(self.preprocess),
                **({"weights_record": record.describe()} if record else {})}
        if not self.uses_fast_path:
            return info
        return {**info, "fast_path": fast_path(), "runtime": runtime(self.images)}


def stack(rows: Sequence[Any]) -> np.ndarray | torch.Tensor:
    """Preprocessed images as one batch: a tensor if they are tensors (torch is then loaded)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(rows[0], torch.Tensor):
        return torch.stack(list(rows))
    return np.stack(rows)


#: Intra-op threads for this process's models, once `set_threads` is called (None: libraries'
#: own defaults).
_THREADS: int | None = None


def set_threads(threads: int | None) -> None:
    """Intra-op threads for this process's models: torch's (now, or when it is first loaded
    through `load_torch`) and every onnxruntime session made after."""
    global _THREADS
    if threads:
        _THREADS = threads
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def threads() -> int:
    """The intra-op threads models get: `set_threads`'s, else torch's if loaded, else the cores."""
    if _THREADS:
        return _THREADS
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else os.cpu_count() or 1


def load_torch() -> Any:
    """torch, imported on first need (2.6-3 s, most of what adding a few paintings would cost)
    and given the process's thread count."""
    import torch

    if _THREADS:
        torch.set_num_threads(_THREADS)
    return torch


def register(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator adding an extractor to the registry under its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def register_family(prefix: str) -> Callable[[Any], Any]:
    """Class decorator for extractors built from a model name: `cls(model, weights=...)`
    answers for every name `prefix:model`."""
    def add(cls: Any) -> Any:
        _FAMILIES[prefix] = cls
        return cls
    return add


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def available() -> list[str]:
    """Names of all registered extractors."""
    _discover()
    return sorted(_REGISTRY)


def extractor_class(name: str) -> type[Extractor]:
    """The registered class of an extractor (its declarations, without making one)."""
    _discover()
    family, sep, model = name.partition(FAMILY_SEP)
    if name not in _REGISTRY and sep and family in _FAMILIES and model:
        return _FAMILIES[family]
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY) + [f"{f}{FAMILY_SEP}MODEL" for f in _FAMILIES])
        raise InfluenceError(f"unknown extractor '{name}' (available: {known})")
    return _REGISTRY[name]


def get_extractor(name: str, weights: str | None = None) -> Extractor:
    """A new extractor by registry name; `weights` is a path, 'random', or None for the default."""
    cls = extractor_class(name)
    if name in _REGISTRY:
        return cls(weights=weights)
    return cls(name.partition(FAMILY_SEP)[2], weights=weights)


def is_known(name: str) -> bool:
    """Whether `get_extractor(name)` names a registered extractor or a model of a family."""
    _discover()
    family, sep, model = name.partition(FAMILY_SEP)
    return name in _REGISTRY or bool(sep and family in _FAMILIES and model)


def optional_import(module: str, package: str) -> Any:
    """A library only some extractors need, or a one-line error saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InfluenceError(f"{module} models need the `{package}` package: "
                             f"pip install 'influence[models]'") from None


def weights_dir() -> Path:
    """Where default weight files named `<extractor>.pth` are looked for before downloading."""
    return Path(os.environ.get("INFLUENCE_WEIGHTS_DIR", "data/weights"))


def locate_weights(name: str, spec: str | None, suffix: str = ".pth") -> Path | str | None:
    """Which weights an extractor uses, in the one documented order, without loading them.

    An explicit spec (a file, or 'random'); else `<weights_dir>/<name><suffix>` if it exists;
    else None: the extractor's own default (torchvision's download, a file shipped in a package).
    """
    if spec == RANDOM:
        return RANDOM
    path = Path(spec) if spec else weights_dir() / f"{name}{suffix}"
    if spec or path.exists():
        if not path.is_file():
            raise InfluenceError(f"weights file for {name} not found: {path}")
        return path.resolve()
    return None


def resolve_state_dict(name: str, spec: str | None,
                       download: Callable[[], Mapping[str, torch.Tensor]],
                       download_label: str) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """Pretrained weights for an extractor, and a label saying where they came from.

    Order (`locate_weights`): an explicit spec (a file, or 'random'); `<weights_dir>/<name>.pth`;
    the extractor's default (torchvision's download, cached under $TORCH_HOME, or a packaged
    file). If that fails the model keeps random weights, and the label and a warning say so:
    features are never silently random.
    """
    path = locate_weights(name, spec)
    if path == RANDOM:
        return None, "random (explicitly requested; seed 0)"
    torch = load_torch()
    if path is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InfluenceError(f"cannot load weights for {name} from {path}: {e}") from None
        return state, f"file {path}"
    try:
        return download(), download_label
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        print(f"WARNING: {name}: pretrained weights could not be obtained ({reason}); using RANDOM "
              f"weights. Give --weights {name}=PATH to use a local file.", file=sys.stderr)
        return None, f"random (pretrained weights unavailable: {reason})"


def load_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None, name: str,
                 optional_prefixes: tuple[str, ...] = ("classifier.",)) -> None:
    """Load a state dict, allowing only the classifier to be absent; random init is seeded."""
    torch = load_torch()
    if state is None:
        torch.manual_seed(0)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(optional_prefixes)]
    if missing or result.unexpected_keys:
        raise InfluenceError(f"weights do not fit {name}: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")


#: How conv nets run (`fast_path`): oneDNN Graph fusion for full batches, frozen TorchScript,
#: or bf16 autocast (never chosen automatically: it fails the agreement test, see below).
ONEDNN_GRAPH, TORCHSCRIPT, BF16 = "fp32, oneDNN Graph fused", "fp32, TorchScript frozen", \
    "bf16 autocast"
#: Environment variable naming a path (`onednn`, `torchscript`, `bf16`) instead of the automatic.
FAST_PATH_ENV = "INFLUENCE_FAST_PATH"
#: Fewer images than this to embed (paintings added to a run) run a conv net through its ONNX
#: copy in onnxruntime (`OnnxCopy`), FEW_BATCH images a call, on an fp32 path: a process's first
#: full batch of 32 costs about 3 s of one core on the fused path (oneDNN's kernels for that
#: size), and importing torch and torchvision another 5 s (docs/pipeline.md). 70 images, two
#: threads: MobileNetV2 0.41 s and EfficientNet-Lite0 0.56 s against 2.7 and 1.9 s eager, the
#: same features to 1e-5 (tests/test_fast_paths.py).
FEW_IMAGES = 256
FEW_BATCH = 8
#: Bump when `export_copy` changes what it writes: copies made by an older one are not read.
COPY_VERSION = "1"
_PATHS = {"onednn": ONEDNN_GRAPH, "torchscript": TORCHSCRIPT, "bf16": BF16}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (`avx512_bf16`, `amx_tile`), or none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(flags.partition(":")[2].split())


def fast_path() -> str:
    """How this machine runs the conv nets: the fastest way that keeps their fp32 features.

    oneDNN Graph fusion where PyTorch has oneDNN on x86, frozen TorchScript elsewhere, unless
    $INFLUENCE_FAST_PATH names one. bf16 autocast (AMX, AVX-512 BF16) is never chosen: on real
    paintings it moved MobileNetV2's features to cosine 0.92 and changed most top-10 neighbour
    sets (docs/speed.md, benchmarks/bench_forward.py). Recorded with the features made.
    """
    chosen = os.environ.get(FAST_PATH_ENV)
    if chosen:
        if chosen not in _PATHS:
            raise InfluenceError(f"unknown {FAST_PATH_ENV} '{chosen}' "
                                 f"(available: {', '.join(_PATHS)})")
        if _PATHS[chosen] == BF16 and "avx512_bf16" not in cpu_flags():
            raise InfluenceError(f"{FAST_PATH_ENV}=bf16 needs a CPU with AVX-512 BF16")
        return _PATHS[chosen]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ONEDNN_GRAPH if x86 else TORCHSCRIPT


def runtime(images: int | None, path: str | None = None) -> str:
    """How a conv net with `images` to embed runs: `onnxruntime` (its ONNX copy) for fewer than
    FEW_IMAGES on an fp32 path (the machine's by default), else `torch` on the fast path."""
    few = images is not None and images < FEW_IMAGES and (path or fast_path()) != BF16
    return "onnxruntime" if few else "torch"


class BF16Autocast:
    """A frozen graph traced under bf16 autocast, returning float32."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        self.graph = graph

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        torch = load_torch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.graph(x.contiguous(memory_format=torch.channels_last)).float()


class FusedForFullBatches:
    """A graph fused by oneDNN Graph for one batch size, and the frozen TorchScript graph for small
    batches: oneDNN Graph compiles per input shape and falls back to a slow path for any other.

    A batch of at least `PAD_SHARE` of the size (the engine's last batch) is padded to it: the
    fused graph is about three times faster per image, so the padding costs less than the plain
    graph would. Each graph is traced and compiled when first needed, so what only embeds a few
    images (a query, the explorer) never pays for the fused one, nor the engine for the plain.
    """

    PAD_SHARE = 1 / 3

    def __init__(self, module: torch.nn.Module, batch: int) -> None:
        self.module, self.batch = module, batch
        self.plain: torch.jit.ScriptModule | None = None
        self.fused: torch.jit.ScriptModule | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n < self.batch * self.PAD_SHARE or n > self.batch:
            if self.plain is None:
                self.plain = _plain(self.module, x[:1])
            return self.plain(x)
        if n < self.batch:
            x = load_torch().cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))])
        if self.fused is None:
            self.fused = _fuse(self.module, x)
        return self.fused(x)[:n]


def _plain(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Frozen TorchScript for any batch size (traced once, without tracing's second check run:
    these are static conv nets)."""
    torch = load_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.optimize_for_inference(torch.jit.trace(module, example,
                                                                check_trace=False))


def _fuse(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    torch = load_torch()
    torch.jit.enable_onednn_fusion(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = torch.jit.freeze(torch.jit.trace(
                module.to(memory_format=torch.channels_last), example, check_trace=False))
            fused(example)
            fused(example)
    finally:
        torch.jit.enable_onednn_fusion(False)
    return fused


def optimize(module: torch.nn.Module, example: torch.Tensor, path: str | None = None
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A conv net ready for inference on this machine's fast path (`fast_path()` unless given).

    TorchScript freezing folds batch norms into convolutions and uses oneDNN kernels (~2-3x
    eager); oneDNN Graph also fuses each convolution with its activation and keeps
    activations in oneDNN's blocked layout (another ~2.5-3x on MobileNetV2, same fp32
    features). `example` is a full batch: the size the fused graph is made for.
    """
    torch = load_torch()
    module.eval()
    path = path or fast_path()
    if path == ONEDNN_GRAPH and not torch.backends.mkldnn.is_available():
        raise InfluenceError(f"this torch has no oneDNN: set {FAST_PATH_ENV}=torchscript")
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        if path == BF16:
            module = module.to(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return BF16Autocast(torch.jit.freeze(torch.jit.trace(module, example[:1],
                                                                     check_trace=False)))
        if path == TORCHSCRIPT:
            return _plain(module, example[:1])
        return FusedForFullBatches(module, len(example))


def onnx_session(graph: Path | bytes, spinning: bool = False) -> Any:
    """An onnxruntime CPU session with `threads()` intra-op threads (one per query in the
    explorer; onnxruntime's own default oversubscribes a busy machine and halves its speed),
    which sleep between calls instead of spinning on the reader's core."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, opts,
                                providers=["CPUExecutionProvider"])


class OnnxCopy:
    """A conv net's pooled features as an ONNX graph in onnxruntime, FEW_BATCH images a call."""

    def __init__(self, graph: Path | bytes) -> None:
        self.session = onnx_session(graph)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([self.session.run(None, {self.input: x[lo:lo + FEW_BATCH]})[0]
                               for lo in range(0, len(x), FEW_BATCH)]).astype(np.float32)


def export_copy(module: torch.nn.Module, size: int, path: Path) -> Path | bytes:
    """`module`'s average-pooled output as an ONNX graph for any batch, written to `path`
    atomically; where it cannot be written, the graph's bytes."""
    import io

    torch = load_torch()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.trunk(x).mean(dim=(2, 3))

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(Pooled().eval(), torch.zeros(1, 3, size, size), buffer, dynamo=False,
                          input_names=["x"], output_names=["features"],
                          dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}})
    return keep_in_cache(path, buffer.getvalue())


class ConvNet(Extractor):
    """A conv net whose trunk's output is average-pooled into one vector per image.

    Many images run through torch on the machine's fast path (`optimize`); a few
    (`runtime`: paintings added to a run) through the trunk's ONNX copy in onnxruntime, kept in
    `cache_dir()` under a name made of the code version and the weights, so a process that finds
    it never imports torch. Loading for many images writes the copy if it is missing, so a
    run's first additions find it. Subclasses say how to build the trunk (`trunk`).
    """

    uses_fast_path = True
    #: Side of the square input the trunk takes.
    input_size: ClassVar[int] = 224

    def __init__(self, weights: str | None = None) -> None:
        super().__init__(weights)
        self._net: Callable[[Any], Any] | None = None

    @abstractmethod
    def trunk(self) -> tuple[torch.nn.Module, str]:
        """The convolutional trunk with its weights loaded, and where they came from."""

    @abstractmethod
    def default_label(self) -> str:
        """What `trunk` says of its default weights when they load (`resolve_state_dict`)."""

    def weights_label(self) -> str:
        """What `trunk` will say of its weights, without loading them (a failed download says
        otherwise, and its copy is kept under that label)."""
        located = self.located_weights()
        if located == RANDOM:
            return "random (explicitly requested; seed 0)"
        return f"file {located}" if located is not None else self.default_label()

    def copy_path(self, label: str) -> Path:
        """Where the ONNX copy of this code and these weights is kept."""
        key = fingerprint([self.code_version(), label, COPY_VERSION])
        return cache_dir() / f"{self.name}-{key[:16]}-v{COPY_VERSION}.onnx"

    def load(self) -> ConvNet:
        if self._net is not None:
            return self
        few = runtime(self.images) == "onnxruntime"
        label = self.weights_label()
        if few and self.copy_path(label).is_file():
            self._net, self.weights_used = OnnxCopy(self.copy_path(label)), label
            return self
        module, self.weights_used = self.trunk()
        copy: Path | bytes = self.copy_path(self.weights_used)
        if not copy.is_file():
            copy = export_copy(module, self.input_size, copy)
        if few:
            self._net = OnnxCopy(copy)
        else:
            torch = load_torch()
            self._net = optimize(module, torch.zeros(self.batch_size, 3, self.input_size,
                                                     self.input_size))
        return self

    def transform(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        self.load()
        if isinstance(self._net, OnnxCopy):
            return self._net(np.asarray(batch))
        torch = load_torch()
        with torch.inference_mode():
            return to_numpy(self._net(torch.as_tensor(batch)).mean(dim=(2, 3)))


def to_numpy(features: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(features.detach().cpu().numpy(), dtype=np.float32)
