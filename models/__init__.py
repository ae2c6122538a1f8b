"""Item-to-item recommendation models (pure Python: numpy, pandas, scipy, TensorFlow; no Spark).

Role: the models the nightly training runs and the evaluation compares, behind one interface
(:class:`models.base.ItemToItemModel`: ``fit(interactions)``, ``recommend(k)``, ``metadata()``).

Inputs: a pandas DataFrame of interactions (``user_id, item_id, event_type, event_time``; see
:func:`models.interactions.read_interactions`) and a :class:`carousel.config.ModelConfig`.

Outputs: recommendation frames (``item_id, rank, rec_item_id, score``).

    from models import build_model
    model = build_model("item2vec", cfg.training.model).fit(interactions)
    recs = model.recommend(cfg.training.top_k)

:data:`MODELS` maps each name to its class: ``item2vec`` (TensorFlow skip-gram, imported lazily
when fitted), and the baselines ``popularity``, ``item_knn``, ``llr``, ``sequential_rules``.
"""

from __future__ import annotations

from typing import Any

from carousel.config import ModelConfig
from models.base import ItemToItemModel, NotFittedError
from models.baselines import ItemKNN, LLRCooccurrence, Popularity, SequentialRules
from models.item2vec import Item2Vec
from models.next_item2vec import NextItem2Vec

__all__ = ["MODELS", "ItemToItemModel", "NotFittedError", "build_model"]

MODELS: dict[str, type[ItemToItemModel]] = {
    NextItem2Vec.name: NextItem2Vec,
    Item2Vec.name: Item2Vec,
    Popularity.name: Popularity,
    ItemKNN.name: ItemKNN,
    LLRCooccurrence.name: LLRCooccurrence,
    SequentialRules.name: SequentialRules,
}


def build_model(name: str, model_cfg: ModelConfig | None = None, **options: Any) -> ItemToItemModel:
    """A fresh, unfitted model called ``name`` (a key of :data:`MODELS`) with these hyperparameters."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
    return cls(model_cfg, **options)
