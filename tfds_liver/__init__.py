"""The `liver` TFDS dataset: DICOM + labels.csv → curated ArrayRecord shards.

Importing this package registers the builder, so `tfds build --imports tfds_liver liver ...` and
`tfds.builder("liver/...")` find it.
"""

from tfds_liver.liver_dataset_builder import Builder, LiverConfig

__all__ = ["Builder", "LiverConfig"]
