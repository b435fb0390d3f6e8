"""Fine-tuning on top of a pretrained CoDe-MAE encoder: heads, metrics, training, evaluation.

``build_task_model_from_checkpoint`` is what ``codemae predict`` loads; nothing here imports
torch at module level.
"""

from codemae_cli.tasks.model_io import build_task_model, build_task_model_from_checkpoint

__all__ = ["build_task_model", "build_task_model_from_checkpoint"]
