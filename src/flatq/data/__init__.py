"""Data: in-memory uint8 data sets, image folders streamed from disk, batch-level
augmentation, loaders, calibration subsets."""

from .bundle import DataBundle, prepare_data
from .calibration import calibration_batches, subset_batches
from .datasets import (ImageTensorDataset, available_datasets, collate_batch, load_cifar,
                       load_dataset, load_digits, load_fashion_mnist, make_synthetic)
from .folder import ImageFolderSet, default_workers, load_image_folder
from .loading import ResumableSampler, make_loader
from .transforms import BatchPipeline, pipeline_for

__all__ = ["ImageTensorDataset", "collate_batch", "load_dataset", "available_datasets",
           "BatchPipeline", "pipeline_for", "calibration_batches", "subset_batches", "load_cifar",
           "load_fashion_mnist", "load_digits", "make_synthetic", "ImageFolderSet",
           "default_workers", "load_image_folder", "ResumableSampler", "make_loader",
           "DataBundle", "prepare_data"]
