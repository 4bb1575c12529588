"""Fine-tuning: the Trainer and its arguments, data pipeline, augmentation, schedules and checkpoints."""

from laformer.training.arguments import TrainingArguments
from laformer.training.augment import EDA, back_translate
from laformer.training.data import (
    ClassificationDataset,
    InstructionDataset,
    PaddingCollator,
    build_label_map,
    load_classification_data,
    load_instruction_data,
    read_records,
)
from laformer.training.trainer import Trainer

__all__ = [
    "EDA",
    "ClassificationDataset",
    "InstructionDataset",
    "PaddingCollator",
    "Trainer",
    "TrainingArguments",
    "back_translate",
    "build_label_map",
    "load_classification_data",
    "load_instruction_data",
    "read_records",
]
