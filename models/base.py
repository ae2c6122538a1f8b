"""The common interface of every item-to-item model.

Role: one contract for the trainer and the evaluation: ``fit`` on an interaction frame,
``recommend(k)`` the k best other items of every item, ``metadata()`` for the model registry.

Inputs: a pandas DataFrame of :data:`carousel.schemas.INTERACTION_COLUMNS` (see
:mod:`models.interactions`); hyperparameters from :class:`carousel.config.ModelConfig`.

Outputs: :meth:`ItemToItemModel.recommend` returns a frame of
:data:`carousel.schemas.RECOMMENDATION_COLUMNS`: per item, ranks 1..m (m <= k; m < k only for
models whose evidence is sparse, e.g. an item co-occurring with fewer than k others), never the
item itself, finite scores not increasing with the rank. :meth:`ItemToItemModel.metadata` returns
a JSON-serialisable dict with at least ``name``, ``model_version``, ``params``, ``n_items``,
``n_users``, ``n_interactions`` and ``train_seconds``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from carousel.config import ModelConfig
from carousel.schemas import MODEL_VERSION_TIME_FORMAT
from models.interactions import Sequences, user_sequences

__all__ = ["ItemToItemModel", "NotFittedError", "data_fingerprint"]


class NotFittedError(RuntimeError):
    """``recommend`` or ``metadata`` was called before ``fit``."""


def data_fingerprint(sequences: Sequences) -> str:
    """A short hash of the training data (vocabulary and sequences)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, sequences.items)).encode())
    digest.update(np.ascontiguousarray(sequences.codes).tobytes())
    digest.update(np.ascontiguousarray(sequences.offsets).tobytes())
    return digest.hexdigest()[:16]


class ItemToItemModel(abc.ABC):
    """Learns item-to-item similarities from interactions; recommends the top k per item.

    Subclasses set :attr:`name`, implement :meth:`_fit` (on the users' sequences) and
    :meth:`_top_k` (indices and scores per item code, -1 padding allowed). ``fit`` takes care of
    building the sequences, timing and the version.
    """

    name: ClassVar[str] = "base"
    # The ModelConfig keys this model uses (None: all of them); they and the keyword
    # parameters make up :attr:`params`, which the model version hashes.
    config_keys: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, model_cfg: ModelConfig | None = None, **params: Any) -> None:
        self.model_cfg = model_cfg
        self.params: dict[str, Any] = {}
        if model_cfg is not None:
            values = model_cfg.model_dump()
            values.pop("name", None)  # which model to build, not a hyperparameter
            keys = self.config_keys if self.config_keys is not None else tuple(values)
            self.params.update({key: values[key] for key in keys})
        self.params.update(params)
        self.sequences: Sequences | None = None
        self.n_interactions = 0
        self.train_seconds = 0.0
        self.fitted_at: datetime | None = None
        self._fingerprint = ""

    # -- the public interface -----------------------------------------------------------------
    def fit(self, interactions: pd.DataFrame) -> Self:
        """Learn from an interaction frame (user_id, item_id, event_type, event_time); returns self."""
        started = time.perf_counter()
        min_count = int(self.params.get("min_item_count", 1) or 1)
        sequences = self._sequences(interactions, min_count)
        if sequences.n_items < 2:
            raise ValueError(
                f"{self.name}: need at least 2 items with >= {min_count} interactions, "
                f"got {sequences.n_items} (from {len(interactions)} interactions)"
            )
        self.sequences = sequences
        self.n_interactions = len(interactions)
        self._fingerprint = data_fingerprint(sequences)
        self._fit(sequences)
        self.train_seconds = time.perf_counter() - started
        self.fitted_at = datetime.now(UTC)
        return self

    def recommend(self, k: int) -> pd.DataFrame:
        """The k best other items of every item (item_id, rank, rec_item_id, score)."""
        from models.topk import to_recommendations

        sequences = self._require_fitted()
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        indices, scores = self._top_k(k)
        return to_recommendations(sequences.items, indices, scores)

    def metadata(self) -> dict[str, Any]:
        """Version, hyperparameters, data counts and timings (JSON-serialisable)."""
        sequences = self._require_fitted()
        return {
            "name": self.name,
            "model_version": self.model_version,
            "params": dict(self.params),
            "n_items": int(sequences.n_items),
            "n_users": int(sequences.n_users),
            "n_interactions": int(self.n_interactions),
            "n_sequence_items": int(len(sequences.codes)),
            "data_fingerprint": self._fingerprint,
            "train_seconds": round(self.train_seconds, 3),
            "fitted_at": self.fitted_at.isoformat() if self.fitted_at else None,
            **self._extra_metadata(),
        }

    @property
    def model_version(self) -> str:
        """``<name>-<UTC fit time>-<hash of the hyperparameters and the data>``."""
        self._require_fitted()
        assert self.fitted_at is not None
        stamp = self.fitted_at.strftime(MODEL_VERSION_TIME_FORMAT)
        config = json.dumps(self.params, sort_keys=True, default=str)
        digest = hashlib.sha256(f"{config}|{self._fingerprint}".encode()).hexdigest()[:12]
        return f"{self.name.replace('_', '-')}-{stamp}-{digest}"

    @property
    def item_ids(self) -> np.ndarray:
        """The item vocabulary (sorted ids) the model was fitted on."""
        return self._require_fitted().items

    # -- for subclasses -----------------------------------------------------------------------
    def _sequences(self, interactions: pd.DataFrame, min_item_count: int) -> Sequences:
        """The users' sequences a fit learns from (a warm-started model keeps its vocabulary)."""
        return user_sequences(interactions, min_item_count=min_item_count)

    @abc.abstractmethod
    def _fit(self, sequences: Sequences) -> None:
        """Learn from the users' time-ordered item sequences."""

    @abc.abstractmethod
    def _top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices (n_items, k) int32, scores (n_items, k)); -1 pads rows with fewer candidates."""

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def _require_fitted(self) -> Sequences:
        if self.sequences is None:
            raise NotFittedError(f"{self.name}: call fit() first")
        return self.sequences

    def _param(self, key: str, default: Any) -> Any:
        value = self.params.get(key)
        return default if value is None else value
