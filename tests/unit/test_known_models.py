"""service.known_models: the predict path's per-process memory of which tenant owns a model."""

from __future__ import annotations

from service.known_models import KnownModels


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_found_model_is_known_for_its_tenant_until_it_expires() -> None:
    clock = Clock()
    known = KnownModels(seconds=5.0, clock=clock)
    assert not known.known("t1", "mdl_a")
    known.remember("t1", "mdl_a", known.generation)
    assert known.known("t1", "mdl_a")
    assert not known.known("t2", "mdl_a")  # another tenant: read from the database
    assert not known.known("t1", "mdl_b")
    clock.now = 104.999
    assert known.known("t1", "mdl_a")
    clock.now = 105.0
    assert not known.known("t1", "mdl_a")
    clock.now = 0.0  # expired entries were dropped, not just hidden
    assert not known.known("t1", "mdl_a")


def test_forget_drops_the_model_for_every_tenant_at_once() -> None:
    known = KnownModels(clock=Clock())
    known.remember("t1", "mdl_a", known.generation)
    known.remember("t2", "mdl_a", known.generation)
    known.remember("t1", "mdl_b", known.generation)
    known.forget("mdl_a")
    assert not known.known("t1", "mdl_a")
    assert not known.known("t2", "mdl_a")
    assert known.known("t1", "mdl_b")


def test_a_lookup_that_started_before_a_delete_is_not_remembered() -> None:
    # The row was read, then the model was deleted and forgotten, then the lookup finished.
    known = KnownModels(clock=Clock())
    started = known.generation
    known.forget("mdl_a")
    known.remember("t1", "mdl_a", started)
    assert not known.known("t1", "mdl_a")
    known.remember("t1", "mdl_a", known.generation)  # a lookup after the forget counts
    assert known.known("t1", "mdl_a")


def test_the_least_recently_checked_model_goes_first_past_the_bound() -> None:
    known = KnownModels(entries=2, clock=Clock())
    known.remember("t", "mdl_1", known.generation)
    known.remember("t", "mdl_2", known.generation)
    assert known.known("t", "mdl_1")  # now the most recently checked
    known.remember("t", "mdl_3", known.generation)
    assert known.known("t", "mdl_1")
    assert not known.known("t", "mdl_2")
    assert known.known("t", "mdl_3")
