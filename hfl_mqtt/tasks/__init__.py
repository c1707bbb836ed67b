"""Training plug-ins: the ``Task`` interface, data sets, partitioners and models.

A node builds its task with ``load_task(config, partition, num_partitions)``; the default
factory (``hfl_mqtt.tasks.builtin:make_task``) serves scikit-learn's digits or the LEAF
Synthetic benchmark to a numpy softmax regression, a numpy MLP, or a torch MLP. The torch model
lives in ``hfl_mqtt.tasks.torch_models``, which needs the ``torch`` extra and is imported only
when used; the digits data set needs the ``sim`` extra (scikit-learn).
"""

from hfl_mqtt.tasks.base import (
    EvalResult,
    PartitionConfig,
    RoundAware,
    SyntheticConfig,
    Task,
    TaskConfig,
    TaskError,
    TaskFactory,
    TrainConfig,
    TrainResult,
    check_weights,
    load_task,
)
from hfl_mqtt.tasks.builtin import clear_caches, make_task
from hfl_mqtt.tasks.datasets import (
    SyntheticData,
    TrainTestSplit,
    load_digits_split,
    make_synthetic,
    stratified_split,
)
from hfl_mqtt.tasks.numpy_models import NumpyTask
from hfl_mqtt.tasks.partition import label_distribution, partition_indices

__all__ = [
    "EvalResult",
    "NumpyTask",
    "PartitionConfig",
    "RoundAware",
    "SyntheticConfig",
    "SyntheticData",
    "Task",
    "TaskConfig",
    "TaskError",
    "TaskFactory",
    "TrainConfig",
    "TrainResult",
    "TrainTestSplit",
    "check_weights",
    "clear_caches",
    "label_distribution",
    "load_digits_split",
    "load_task",
    "make_synthetic",
    "make_task",
    "partition_indices",
    "stratified_split",
]
