"""Strictness and references across documents (CFG-3, CFG-4, CFG-8); every problem at once."""

from __future__ import annotations

import pytest
from cfgdocs import (
    N_SERVICES,
    SERVICES,
    find,
    line_of,
    load,
    problems,
    problems_with_services,
    with_services,
)

from meshlib.config.loader import load_text
from meshlib.errors import ConfigError


def split(*backends: tuple[str, object], root: str = "reviews", name: str = "canary") -> str:
    lines = "".join(f"  - service: {svc}\n    weight: {w}\n" for svc, w in backends)
    return (
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\n"
        f"metadata: {{name: {name}}}\nspec:\n  service: {root}\n  backends:\n{lines}"
    )


def test_unknown_kind_suggests_closest() -> None:
    text = split(("reviews-v1", 1)).replace("kind: TrafficSplit", "kind: TrafficSplitt")
    p = find(problems_with_services(text), "kind", "unknown kind 'TrafficSplitt'")
    assert "did you mean 'TrafficSplit'" in p.message
    assert p.line == line_of(with_services(text), "TrafficSplitt")
    assert p.document == N_SERVICES + 1


def test_unknown_kind_without_close_match_lists_kinds() -> None:
    p = find(problems("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"), "kind")
    assert "known kinds:" in p.message and "TrafficPolicy" in p.message


def test_unknown_field_suggests_closest() -> None:
    text = split(("reviews-v1", 1)).replace("    weight: 1", "    weigth: 1")
    found = problems_with_services(text)
    p = find(found, "spec.backends[0].weigth", "unknown field 'weigth'")
    assert "did you mean 'weight'" in p.message
    assert p.line == line_of(with_services(text), "weigth")
    assert find(found, "spec.backends[0].weight", "missing required")


def test_unknown_top_level_and_metadata_fields() -> None:
    text = split(("reviews-v1", 1)) + "status: {}\n"
    text = text.replace("metadata: {name: canary}", "metadata: {name: canary, namspace: x}")
    found = problems_with_services(text)
    assert find(found, "status", "unknown field")
    assert "did you mean 'namespace'" in find(found, "metadata.namspace").message


def test_wrong_types_and_missing_fields() -> None:
    text = """
apiVersion: meshlib/v1
kind: Service
metadata: {namespace: Bad_NS}
spec:
  port: "80"
  endpoints: {address: "h:1"}
"""
    found = problems(text)
    assert find(found, "metadata.name", "missing required")
    assert find(found, "metadata.namespace", "DNS label")
    assert "must be an integer, got a string" in find(found, "spec.port").message
    assert "must be a list, got a mapping" in find(found, "spec.endpoints").message


def test_document_not_a_mapping_and_missing_kind() -> None:
    found = problems("- a\n- b\n---\napiVersion: meshlib/v1\nmetadata: {name: x}\n")
    assert find(found, "", "must be a mapping").document == 1
    assert find(found, "kind", "missing kind").document == 2


def test_config_error_lists_every_problem_at_once() -> None:
    text = with_services(
        split(("reviews-v1", -1), ("ghost", 10)),
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec: {timeout: -1s, retries: {attempts: 2, perTryTimeout: 0.5ms}}\n",
        "apiVersion: meshlib/v1\nkind: Bogus\nmetadata: {name: b}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_text(text, source="many.yaml")
    found = info.value.problems
    fields = {(p.document, p.field) for p in found}
    assert {
        (N_SERVICES + 1, "spec.backends[0].weight"),
        (N_SERVICES + 1, "spec.backends[1].service"),
        (N_SERVICES + 2, "spec.timeout"),
        (N_SERVICES + 2, "spec.retries.perTryTimeout"),
        (N_SERVICES + 3, "kind"),
    } <= fields
    assert all(p.file == "many.yaml" and p.line > 0 for p in found)
    assert str(info.value).startswith(f"{len(found)} problems in policy:")
    assert [p.document for p in found] == sorted(p.document for p in found)


# --- CFG-4 weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "field", "message"),
    [
        ((-10, 10), "spec.backends[0].weight", "at least 0"),
        ((1.5, 10), "spec.backends[0].weight", "whole number"),
        ((0, 0), "spec.backends", "all weights are zero"),
        ((2**40, 1), "spec.backends[0].weight", "at most 2147483647"),
    ],
)
def test_bad_weights(weights: tuple[object, object], field: str, message: str) -> None:
    text = split(("reviews-v1", weights[0]), ("reviews-v2", weights[1]))
    p = find(problems_with_services(text), field, message)
    assert p.document == N_SERVICES + 1
    assert p.line > 0


def test_single_backend_with_zero_weight_rejected() -> None:
    p = find(problems_with_services(split(("reviews-v1", 0))), "spec.backends")
    assert "all weights are zero" in p.message


def test_relative_weights_accepted() -> None:
    s = load(split(("reviews-v1", 30), ("reviews-v2", 30))).splits["reviews.default"]
    assert [b.weight for b in s.backends] == [30, 30]


def test_zero_weight_backend_beside_a_live_one_is_fine() -> None:
    s = load(split(("reviews-v1", 0), ("reviews-v2", 100))).splits["reviews.default"]
    assert [b.weight for b in s.backends] == [0, 100]


# --- CFG-8 references -------------------------------------------------------------------------


def test_dangling_split_backend() -> None:
    text = split(("reviews-v1", 50), ("reviews-v3", 50))
    p = find(problems_with_services(text), "spec.backends[1].service", "not declared")
    assert "'reviews-v3'" in p.message and "'default'" in p.message
    assert p.line == line_of(with_services(text), "service: reviews-v3")


def test_dangling_split_root() -> None:
    p = find(problems_with_services(split(("reviews-v1", 1), root="nope")), "spec.service")
    assert "not declared" in p.message


def test_self_referencing_split() -> None:
    text = split(("reviews-v1", 100), ("reviews", 900))
    p = find(problems_with_services(text), "spec.backends[1].service", "itself")
    assert p.document == N_SERVICES + 1


def test_chained_split_rejected() -> None:
    first = split(("reviews-v1", 1), ("reviews-v2", 1))
    second = split(("ratings", 1), root="reviews-v1", name="chained")
    text = split(("reviews-v1", 1), root="ratings", name="uses-chain")
    found = problems_with_services(first, second, text)
    p = find(found, "spec.backends[0].service", "may not chain")
    assert p.document in (N_SERVICES + 1, N_SERVICES + 3)


def test_two_splits_for_one_root() -> None:
    found = problems_with_services(split(("reviews-v1", 1)), split(("reviews-v2", 1), name="other"))
    assert find(found, "spec.service", "already has a TrafficSplit").document == N_SERVICES + 2


def test_duplicate_backend_in_one_split() -> None:
    text = split(("reviews-v1", 1), ("reviews-v1.default", 2))
    assert find(problems_with_services(text), "spec.backends[1].service", "listed twice")


def test_duplicate_resource_names_same_kind_and_namespace() -> None:
    dup = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
    p = find(problems(SERVICES + "---\n" + dup), "metadata.name", "duplicate Service 'reviews'")
    assert "document 1" in p.message
    other_ns = dup.replace("{name: reviews}", "{name: reviews, namespace: shop}")
    assert "reviews.shop" in load_text(SERVICES + "---\n" + other_ns).services


def test_cross_namespace_service_reference() -> None:
    shop = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\n"
    snap = load(shop, split(("cart.shop", 1), ("reviews-v1", 1)))
    assert [b.service for b in snap.splits["reviews.default"].backends] == [
        "cart.shop",
        "reviews-v1.default",
    ]
    bad = split(("cart.shop.extra", 1))
    assert find(problems_with_services(shop, bad), "spec.backends[0].service", "name.namespace")
