"""A run's data: the training and test sets of a `DataConfig` and the pipelines that feed them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from ..errors import ConfigError
from .datasets import ImageTensorDataset, canonical_name, load_dataset
from .folder import ImageFolderSet
from .transforms import BatchPipeline, pipeline_for


@dataclass
class DataBundle:
    """The data sets of a run and the batch pipelines that feed them to the model."""
    train: ImageTensorDataset | ImageFolderSet
    test: ImageTensorDataset | ImageFolderSet
    train_pipeline: BatchPipeline
    eval_pipeline: BatchPipeline

    @property
    def channels(self) -> int:
        return self.eval_pipeline.output_shape(self.train.sample_shape)[0]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def prepare_data(config: DataConfig, folder_size: int | None = None) -> DataBundle:
    """The data set `config` names, with its training (augmented as configured) and
    evaluation pipelines. An image folder is decoded at `folder_size` (the caller knows the
    model's input size; `flatq.train.run_io.data_for_model`), else at `config.image_size`.

    Raises:
        ConfigError: an unknown data set name, an image folder without a size.
        DataError: the files are missing or damaged.
    """
    size, options = config.image_size, {}
    if canonical_name(config.name) == "imagefolder":
        size = folder_size or size
        if size is None:
            raise ConfigError("an image folder needs an image size (--image-size)")
        options = {"size": size, "augment": config.augment, "workers": config.workers}
    train, test = load_dataset(config.name, config.root, **options)
    return DataBundle(
        train, test,
        pipeline_for(config.name, size=size, channels=config.channels, augment=config.augment),
        pipeline_for(config.name, size=size, channels=config.channels, augment=False))
