"""Feature extraction as clip-retrieval does it: reader, mapper, writer, a runner per partition,
and distributors that decide where the runner runs.

- `plan` (`plan_extraction`): each feature set's step, resets, fits (on the driver, once), and
  the pending images cut into partitions that say which images each set still needs;
- `reader` (`read`): a partition's images decoded once for every extractor, each one's
  preprocessing applied, a bad file kept as its reason;
- `mapper` (`FeatureMapper`): `{image_id, pixels}` -> `{image_id, features, weights}`;
- `store` (`PartWriter`, `FeatureStore`): atomic part files through fsspec, the aligned matrix,
  `features/<name>.rejected.csv`;
- `runner` (`Runner`): one partition through reader, mappers and writers, with its report;
- `distributor` (`LocalDistributor`: in this process, or in forked runner processes side by
  side) and `ray_distributor` (`RayDistributor`): where the runner is called; the Ray one
  imports this core, never the reverse;
- `stage` (`extract_many`, `extract_features`): the stage through the run protocol.
"""

from influence.extract.distributor import LocalDistributor, Outcome
from influence.extract.mapper import FeatureMapper
from influence.extract.plan import PART_SIZE, Partition, Plan, extraction_step, plan_extraction
from influence.extract.reader import DecodedCache, Item, default_workers
from influence.extract.runner import Runner, Timings
from influence.extract.stage import ENGINES, extract_features, extract_many, finalize
from influence.extract.store import FeatureStore, PartWriter

__all__ = ["ENGINES", "PART_SIZE", "DecodedCache", "FeatureMapper", "FeatureStore", "Item",
           "LocalDistributor", "Outcome", "PartWriter", "Partition", "Plan", "Runner", "Timings",
           "default_workers", "extract_features", "extract_many", "extraction_step", "finalize",
           "plan_extraction"]
