"""Deterministic A/B assignment and payload ids, identical in Python and in Spark.

Role: a user's variant in a campaign depends only on (campaign name, user id): the first 60 bits
of SHA-256("<campaign>:<user_id>") give a point in [0, 1); the control group takes
``[0, control_share)`` and the variants follow in the order they are declared, each taking its
share. The streaming path, the batch path and the report all call these functions, so a user
lands in the same arm everywhere and on every run. :func:`assign_variant` is the plain-Python
form (tests, notebooks); :func:`variant_column` is the same rule as a Spark column.

Payload ids are deterministic too, so senders can drop duplicates and re-runs are recognisable:
a trigger's payload id is derived from (trigger event id, campaign, channel), a batch campaign's
from (run id, campaign, channel, user id).
"""

from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

from carousel.config import CampaignConfig
from carousel.schemas import CONTROL_VARIANT

DEFAULT_VARIANT = "default"
_HASH_HEX_DIGITS = 15  # 60 bits: fits a signed long in Spark's conv()
_HASH_SCALE = float(16**_HASH_HEX_DIGITS)


def arms(campaign: CampaignConfig) -> list[tuple[str, float]]:
    """The campaign's arms as (name, upper bound of its bucket range), control first."""
    bounds: list[tuple[str, float]] = []
    upper = 0.0
    if campaign.control_share > 0:
        upper = campaign.control_share
        bounds.append((CONTROL_VARIANT, upper))
    if not campaign.variants:
        bounds.append((DEFAULT_VARIANT, 1.0))
        return bounds
    for variant in campaign.variants:
        upper += variant.share
        bounds.append((variant.name, upper))
    # Shares sum to 1 (validated); the last arm takes any floating-point remainder.
    bounds[-1] = (bounds[-1][0], 1.0)
    return bounds


def bucket(campaign_name: str, user_id: str) -> float:
    """The user's point in [0, 1) for this campaign."""
    digest = hashlib.sha256(f"{campaign_name}:{user_id}".encode()).hexdigest()
    return int(digest[:_HASH_HEX_DIGITS], 16) / _HASH_SCALE


def assign_variant(campaign_name: str, campaign: CampaignConfig, user_id: str) -> str:
    point = bucket(campaign_name, user_id)
    for name, upper in arms(campaign):
        if point < upper:
            return name
    return arms(campaign)[-1][0]


def bucket_column(campaign_name: str, user_id: Column) -> Column:
    digest = F.sha2(F.concat(F.lit(f"{campaign_name}:"), user_id), 256)
    return F.conv(F.substring(digest, 1, _HASH_HEX_DIGITS), 16, 10).cast("double") / F.lit(_HASH_SCALE)


def variant_column(campaign_name: str, campaign: CampaignConfig, user_id: Column) -> Column:
    """The same assignment as :func:`assign_variant`, as a Spark column."""
    point = bucket_column(campaign_name, user_id)
    bounds = arms(campaign)
    expr = F.lit(bounds[-1][0])
    for name, upper in reversed(bounds[:-1]):
        expr = F.when(point < F.lit(upper), F.lit(name)).otherwise(expr)
    return expr


def trigger_payload_id(trigger_event_id: str, campaign_name: str, channel: str) -> str:
    return hashlib.sha256(f"trigger|{trigger_event_id}|{campaign_name}|{channel}".encode()).hexdigest()[:32]


def trigger_payload_id_column(trigger_event_id: Column, campaign_name: str, channel: str) -> Column:
    text = F.concat(F.lit("trigger|"), trigger_event_id, F.lit(f"|{campaign_name}|{channel}"))
    return F.substring(F.sha2(text, 256), 1, 32)


def run_payload_id(run_id: str, campaign_name: str, channel: str, user_id: str) -> str:
    return hashlib.sha256(f"run|{run_id}|{campaign_name}|{channel}|{user_id}".encode()).hexdigest()[:32]


def run_payload_id_column(run_id: str, campaign_name: str, channel: str, user_id: Column) -> Column:
    text = F.concat(F.lit(f"run|{run_id}|{campaign_name}|{channel}|"), user_id)
    return F.substring(F.sha2(text, 256), 1, 32)
