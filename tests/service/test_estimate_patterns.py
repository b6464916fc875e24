"""The estimate job's ``include`` / ``exclude``: the globs of ``bitalloc run``, checked at
submission."""

from __future__ import annotations

from allocator.service.jobs import estimate_spec_of


def test_include_exclude_are_globs_of_the_spec() -> None:
    spec = estimate_spec_of({"model": "m", "method": "datafree", "include": "model.layers.0",
                             "exclude": ["*.o_proj", "lm_head"]})
    assert spec.include == ("model.layers.0",) and spec.exclude == ("*.o_proj", "lm_head")


def test_a_bad_pattern_is_refused_at_submission(client) -> None:  # type: ignore[no-untyped-def]
    for bad, needle in (("layer(", "neither a glob nor a valid regex"), ([""], "non-empty glob")):
        r = client.post("/v1/jobs", json={"kind": "estimate",
                                          "params": {"model": "models/tiny", "include": bad}})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_parameter" and needle in r.text
