"""Training with the published re-ID recipes: ``train()`` in Python, ``reid-ms train`` on the command line.

::

    from reid_ms.training import train
    result = train("vit_b16_ms", dataset="market1501", root="data/market1501", out="runs/market",
                   pretrained="jx_vit_base_p16_224-80ecf9dd.pth", overrides={"stride_size": 12})
    result.history[-1]["mAP"]

See :func:`train` for the files a run writes and how it resumes, :class:`Recipe` for the recipes.
"""

from reid_ms.training.loop import AMP_DTYPES, DATASETS, TrainContext, TrainResult, train
from reid_ms.training.recipes import RECIPES, Recipe, TrainHook, get_recipe

__all__ = ["train", "TrainResult", "TrainContext", "Recipe", "TrainHook", "RECIPES", "get_recipe", "DATASETS",
           "AMP_DTYPES"]
