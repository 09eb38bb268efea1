"""wsi-pipe: whole-slide image pipeline for computational pathology.

Stages: tile -> pretrain/finetune -> extract -> train-mil, locally or as Slurm job arrays.
"""

__version__ = "0.1.0"
