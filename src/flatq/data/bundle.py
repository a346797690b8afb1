"""A run's data: the training and test sets of a `DataConfig` and the pipelines that feed them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from .datasets import ImageTensorDataset, load_dataset
from .transforms import BatchPipeline, pipeline_for


@dataclass
class DataBundle:
    """The data sets of a run and the batch pipelines that feed them to the model."""
    train: ImageTensorDataset
    test: ImageTensorDataset
    train_pipeline: BatchPipeline
    eval_pipeline: BatchPipeline

    @property
    def channels(self) -> int:
        return self.eval_pipeline.output_shape(self.train.images.shape[1:])[0]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def prepare_data(config: DataConfig) -> DataBundle:
    """The data set `config` names, with its training (augmented as configured) and
    evaluation pipelines.

    Raises:
        ConfigError: an unknown data set name.
        DataError: the files are missing or damaged.
    """
    train, test = load_dataset(config.name, config.root)
    return DataBundle(
        train, test,
        pipeline_for(config.name, size=config.image_size, channels=config.channels,
                     augment=config.augment),
        pipeline_for(config.name, size=config.image_size, channels=config.channels,
                     augment=False))
