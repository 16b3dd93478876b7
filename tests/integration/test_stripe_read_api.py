"""The fake of Stripe's read API (loadtest/stripe_api.py), through HTTP as a client sees it."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from intentflow.loadtest.stripe_api import StripeReadApi
from intentflow.stripekit import events

NOW = 1_750_000_000
DAY = 24 * 3600


def intent_at(pid: str, created: int, status: str, etype: str | None = None) -> dict[str, Any]:
    """An event carrying intent `pid` in `status`, the intent made at NOW - 1 day."""
    obj = events.payment_intent(pid, amount=1000, status=status, created=NOW - DAY)
    obj["latest_charge"] = f"ch_{pid}"
    return events.stamped(obj, etype or events.EVENT_TYPE_OF_STATUS[status], created)


def typed(event_type: str, created: int) -> dict[str, Any]:
    return events.stamped(events.charge_object("pi_any", amount=100), event_type, created)


@pytest.fixture
async def api() -> AsyncIterator[StripeReadApi]:
    async with StripeReadApi(now=NOW) as fake:
        yield fake


def client(api: StripeReadApi, **headers: str) -> httpx.AsyncClient:
    auth = {"Authorization": f"Bearer {api.api_key}"}
    return httpx.AsyncClient(base_url=api.base_url, headers={**auth, **headers})


async def get(api: StripeReadApi, path: str, params: Any = None, **headers: str) -> Any:
    async with client(api, **headers) as http:
        return (await http.get(path, params=params)).json()


async def test_pages_with_starting_after_return_every_event_once_newest_first(
    api: StripeReadApi,
) -> None:
    # Ties on `created` (every third pair) list the later added first.
    given = [typed("charge.succeeded", NOW - 1000 + i // 2) for i in range(25)]
    api.add_events(given)
    newest_first = sorted(enumerate(given), key=lambda ie: (ie[1]["created"], ie[0]), reverse=True)
    expected = [e["id"] for _, e in newest_first]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 10}
    async with client(api) as http:
        while True:
            page = (await http.get("/v1/events", params=params)).json()
            assert page["object"] == "list" and page["url"] == "/v1/events"
            seen += [e["id"] for e in page["data"]]
            if not page["has_more"]:
                break
            params["starting_after"] = seen[-1]
        back = await http.get("/v1/events", params={"limit": 10, "ending_before": seen[20]})
    assert seen == expected
    assert [e["id"] for e in back.json()["data"]] == expected[10:20]
    assert back.json()["has_more"] is True


async def test_created_window_and_thirty_days_back(api: StripeReadApi) -> None:
    ages = [40 * DAY, 100, 50, 10]
    api.add_events(typed("charge.succeeded", NOW - age) for age in ages)
    everything = await get(api, "/v1/events")
    window = await get(api, "/v1/events", {"created[gte]": NOW - 100, "created[lt]": NOW - 10})
    assert [e["created"] for e in everything["data"]] == [NOW - 10, NOW - 50, NOW - 100]
    assert [e["created"] for e in window["data"]] == [NOW - 50, NOW - 100]


async def test_type_wildcard_and_types(api: StripeReadApi) -> None:
    names = ["charge.succeeded", "charge.dispute.created", "payment_intent.succeeded", "chargex"]
    api.add_events(typed(name, NOW - i) for i, name in enumerate(names))

    async def types_of(params: Any) -> list[str]:
        return [e["type"] for e in (await get(api, "/v1/events", params))["data"]]

    assert await types_of({"type": "charge.*"}) == ["charge.succeeded", "charge.dispute.created"]
    assert await types_of({"type": "*.succeeded"}) == [
        "charge.succeeded",
        "payment_intent.succeeded",
    ]
    both = ["payment_intent.succeeded", "chargex"]
    assert await types_of([("types[]", t) for t in both]) == both
    assert await types_of([("types[0]", both[0]), ("types[1]", both[1])]) == both


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ([("type", "charge.*"), ("types[]", "charge.succeeded")], "types"),
        ([("types[]", f"t{i}") for i in range(21)], "types"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"starting_after": "evt_unknown"}, "starting_after"),
        ({"created[after]": 1}, "created[after]"),
    ],
)
async def test_bad_parameters_are_refused_like_stripe(
    api: StripeReadApi, params: Any, param: str
) -> None:
    async with client(api) as http:
        answer = await http.get("/v1/events", params=params)
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.json()["error"]["param"] == param
    assert api.requests[-1].status == 400


async def test_stripe_account_scopes_events_and_leaves_out_account(api: StripeReadApi) -> None:
    platform = typed("charge.succeeded", NOW - 2)
    connected = {**typed("charge.succeeded", NOW - 1), "account": "acct_shop"}
    given = [platform, connected]
    before = copy.deepcopy(given)
    api.add_events(given)
    api.add_account("acct_quiet")
    mine = await get(api, "/v1/events", **{"Stripe-Account": "acct_shop"})
    assert [e["id"] for e in mine["data"]] == [connected["id"]]
    assert "account" not in mine["data"][0]  # the backfill sets it from Stripe-Account
    assert [e["id"] for e in (await get(api, "/v1/events"))["data"]] == [platform["id"]]
    assert await get(api, "/v1/events", **{"Stripe-Account": "acct_quiet"}) == {
        "object": "list",
        "url": "/v1/events",
        "has_more": False,
        "data": [],
    }
    async with client(api, **{"Stripe-Account": "acct_nobody"}) as http:
        refused = await http.get("/v1/events")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "account_invalid"
    accounts = await get(api, "/v1/accounts")
    assert sorted(a["id"] for a in accounts["data"]) == ["acct_quiet", "acct_shop"]
    assert (await get(api, "/v1/accounts", **{"Stripe-Account": "acct_shop"}))["data"] == []
    assert given == before  # the fake copies what it is given
    assert api.requests[0].account == "acct_shop"


async def test_latest_snapshot_and_expanded_latest_charge(api: StripeReadApi) -> None:
    api.add_events(
        [
            intent_at("pi_a", NOW - 30, "requires_capture"),
            intent_at("pi_a", NOW - 20, "succeeded"),
            events.stamped(events.charge_object("pi_a", amount=1000), "charge.captured", NOW - 20),
            intent_at("pi_b", NOW - 10, "requires_capture"),
        ]
    )
    api.add_events([intent_at("pi_a", NOW - 25, "processing")])  # older, added later
    listed = await get(api, "/v1/payment_intents", {"expand[]": "data.latest_charge"})
    by_id = {pi["id"]: pi for pi in listed["data"]}
    assert by_id["pi_a"]["status"] == "succeeded"
    assert by_id["pi_a"]["latest_charge"]["object"] == "charge"
    assert by_id["pi_b"]["latest_charge"] == "ch_pi_b"  # no charge known: the id stays
    assert [pi["id"] for pi in listed["data"]] == ["pi_b", "pi_a"]  # same created: by id
    one = await get(api, "/v1/payment_intents/pi_a", {"expand[0]": "latest_charge"})
    assert one["latest_charge"]["id"] == "ch_pi_a"
    assert (await get(api, "/v1/payment_intents/pi_a"))["latest_charge"] == "ch_pi_a"
    charges = await get(api, "/v1/charges", {"payment_intent": "pi_b"})
    assert charges["data"] == []
    async with client(api) as http:
        missing = await http.get("/v1/payment_intents/pi_zzz")
        unknown = await http.get("/v1/customers")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "resource_missing")
    assert unknown.status_code == 404


async def test_rate_limit_every_nth_and_fail_next_first() -> None:
    async with StripeReadApi(now=NOW, rate_limit_every=3) as api, client(api) as http:
        statuses = [(await http.get("/v1/events")).status_code for _ in range(6)]
        api.fail_next(2, status=500)
        failed = [await http.get("/v1/events") for _ in range(3)]
    assert statuses == [200, 200, 429, 200, 200, 429]
    assert [r.status_code for r in failed] == [500, 500, 429]  # request 9: every 3rd
    assert failed[0].json()["error"]["type"] == "api_error"
    assert failed[2].json()["error"]["code"] == "rate_limit"
    assert [r.status for r in api.requests] == [*statuses, 500, 500, 429]


async def test_a_request_without_the_key_is_refused(api: StripeReadApi) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        bare = await http.get("/v1/events")
        wrong = await http.get("/v1/events", headers={"Authorization": "Bearer sk_test_other"})
        basic = await http.get("/v1/events", auth=(api.api_key, ""))
    assert [bare.status_code, wrong.status_code, basic.status_code] == [401, 401, 200]
    assert bare.json()["error"]["type"] == "invalid_request_error"
