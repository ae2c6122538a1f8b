"""The recommendations endpoint's parameter checks (pure: :func:`carousel.api.recommendation_request`).

The direct route and the FastAPI route both use them; the HTTP behaviour is in test_api.py."""

from __future__ import annotations

import pytest

from carousel.api import N_MAX, ApiError, check_request_id, recommendation_request


def refusal(**params: str | None) -> ApiError:
    args = {"user_id": "u-1", "campaign": "launch", "item_id": None, "n": None, "request_id": None} | params
    with pytest.raises(ApiError) as caught:
        recommendation_request(**args)  # type: ignore[arg-type]
    return caught.value


def test_a_good_request_is_read_with_its_count_and_a_random_id_when_none_is_given() -> None:
    request = recommendation_request("u-1", "launch", "sku-9", "3", "retry-1")
    assert (request.user_id, request.campaign, request.item_id, request.n, request.request_id) == (
        "u-1",
        "launch",
        "sku-9",
        3,
        "retry-1",
    )
    first, second = (recommendation_request("u-1", "launch", None, None, None) for _ in range(2))
    assert first.n is None and first.request_id != second.request_id and len(first.request_id) == 32
    # Only a request the client named can come again: only its answer is kept for a retry.
    assert request.replayable and not first.replayable


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"campaign": None}, "query campaign: Field required"),
        ({"campaign": ""}, "query campaign: String should have at least 1 character"),
        ({"campaign": "c" * 129}, "query campaign: String should have at most 128 characters"),
        ({"item_id": ""}, "query item_id: String should have at least 1 character"),
        ({"user_id": "u" * 257}, "path user_id: String should have at most 256 characters"),
        ({"n": "many"}, "query n: Input should be a valid integer, unable to parse string as an integer"),
        ({"n": "4.5"}, "query n: Input should be a valid integer, unable to parse string as an integer"),
        ({"n": "0"}, "query n: Input should be greater than or equal to 1"),
        ({"n": str(N_MAX + 1)}, f"query n: Input should be less than or equal to {N_MAX}"),
    ],
)
def test_a_bad_parameter_is_refused_with_fastapis_wording(params: dict[str, str | None], reason: str) -> None:
    error = refusal(**params)
    assert (error.status, error.code, error.reason) == (422, "bad_parameter", reason)


def test_every_bad_parameter_is_named_and_a_bad_request_id_is_refused_on_its_own() -> None:
    error = refusal(campaign=None, n="0", request_id="a b")
    assert (
        error.reason == "query campaign: Field required; query n: Input should be greater than or equal to 1"
    )
    request = recommendation_request("u-1", "launch", None, "4.0", "a b")  # pydantic's int: 4.0 is 4
    assert request.n == 4
    with pytest.raises(ApiError) as caught:
        check_request_id(request)
    assert (caught.value.status, caught.value.code) == (
        422,
        "bad_request_id",
    ) and "'a b'" in caught.value.reason
    check_request_id(recommendation_request("u-1", "launch", None, None, "retry-1"))
    check_request_id(recommendation_request("u-1", "launch", None, None, None))
