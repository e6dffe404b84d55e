"""Every rule of the model cache, with fake models (exact sizes, controllable load times) and real tensors."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import psutil
import pytest
import torch

from studio.cache import CacheBusy, ModelCache, ModelLoadError, ModelTooLarge
from studio.registry import ModelSpec, Registry, UnknownModelError

MB = 2**20


class Fake:
    def __init__(self, spec: ModelSpec):
        self.id = spec.id
        self.nbytes = spec.params


def registry(**sizes_mb: int) -> Registry:
    return Registry("test", [ModelSpec(id=k, modality="chat", label=k, loader="x:y", params=v * MB)
                             for k, v in sizes_mb.items()])


class Loader:
    """Counts loads per model, can be slowed down or made to fail."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, spec: ModelSpec, device: str) -> Fake:
        with self.lock:
            self.calls.append(spec.id)
        time.sleep(self.delay)
        if spec.id in self.fail:
            raise OSError(f"weights of {spec.id} are corrupt")
        return Fake(spec)


def make_cache(budget_mb: int, loader: Loader | None = None, **kw) -> tuple[ModelCache, Loader]:
    loader = loader or Loader()
    cache = ModelCache(registry(a=40, b=30, c=20, d=50, huge=200), budget=budget_mb * MB, loader=loader,
                       estimate=lambda spec, dev: spec.params, measure=lambda m: m.nbytes, **kw)
    return cache, loader


def resident(cache: ModelCache) -> list[str]:
    return sorted(m.id for m in cache.snapshot().models if m.state == "resident")


def test_lazy_load_then_hit():
    cache, loader = make_cache(100)
    assert resident(cache) == []
    with cache.use("a") as lease:
        assert not lease.hit and lease.model.id == "a"
    with cache.use("a") as lease:
        assert lease.hit and lease.load_seconds == 0
    snap = cache.snapshot()
    assert loader.calls == ["a"] and (snap.hits, snap.misses, snap.loads) == (1, 1, 1)


def test_unknown_model():
    cache, _ = make_cache(100)
    with pytest.raises(UnknownModelError, match="available"):
        with cache.use("nope"):
            pass


def test_single_flight_with_threads():
    cache, loader = make_cache(100, Loader(delay=0.3))
    barrier = threading.Barrier(8)
    models = []

    def worker():
        barrier.wait()
        with cache.use("a") as lease:
            models.append(lease.model)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == ["a"]
    assert len(models) == 8 and all(m is models[0] for m in models)


def test_lru_eviction_order():
    cache, _ = make_cache(100)
    for name in ("a", "b", "c"):  # 40 + 30 + 20 = 90
        with cache.use(name):
            pass
    with cache.use("a"):  # a is now the most recently used
        pass
    with cache.use("d"):  # needs 50: evicts b (LRU, 30), then c (20)
        pass
    assert resident(cache) == ["a", "d"]
    assert cache.snapshot().evictions == 2


def test_pinned_model_is_never_evicted_and_request_waits_bounded():
    cache, _ = make_cache(100, load_timeout=0.5)
    with cache.use("a"), cache.use("d"):  # 90 MB pinned
        start = time.monotonic()
        with pytest.raises(CacheBusy, match="in use"):
            with cache.use("b"):
                pass
        assert 0.4 < time.monotonic() - start < 3
        assert resident(cache) == ["a", "d"]
    with cache.use("b"):  # once released, it fits by evicting an idle model
        pass


def test_waiting_request_proceeds_when_pin_released():
    cache, _ = make_cache(100, load_timeout=10)
    got = []
    with cache.use("a"), cache.use("d"):
        t = threading.Thread(target=lambda: got.append(cache.use("b").__enter__().model.id))
        t.start()
        time.sleep(0.3)
        assert not got
    t.join(5)
    assert got == ["b"]


def test_budget_never_exceeded_under_concurrency():
    cache, _ = make_cache(100, Loader(delay=0.01), load_timeout=30)
    peak = []
    names = ["a", "b", "c", "d"] * 10
    errors = []

    def worker(name):
        try:
            with cache.use(name):
                peak.append(cache.snapshot().used_bytes)
                time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert max(peak) <= 100 * MB and cache.snapshot().peak_bytes <= 100 * MB


def test_model_larger_than_budget_is_a_clear_error():
    cache, loader = make_cache(100)
    with pytest.raises(ModelTooLarge, match="huge needs about 200.00 MiB.*budget of 100.00 MiB"):
        with cache.use("huge"):
            pass
    assert loader.calls == [] and cache.snapshot().used_bytes == 0


def test_failing_load_leaves_cache_consistent_and_retries():
    loader = Loader(delay=0.2)
    loader.fail.add("a")
    cache, _ = make_cache(100, loader)
    errors = []

    def worker():
        try:
            with cache.use("a"):
                pass
        except ModelLoadError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all("a" in e and "corrupt" in e for e in errors)
    assert loader.calls == ["a"]  # the waiters got the same error, no retry storm
    snap = cache.snapshot()
    assert snap.models == [] and snap.used_bytes == 0 and snap.load_failures == 1
    loader.fail.clear()
    with cache.use("a") as lease:  # the next request tries again
        assert lease.model.id == "a"


def test_swap_strategy_frees_after_each_request():
    cache, loader = make_cache(100, strategy="swap")
    for _ in range(3):
        with cache.use("a"):
            assert resident(cache) == ["a"]
        assert resident(cache) == []
    assert loader.calls == ["a", "a", "a"]


def test_preload_and_manual_unload():
    cache, loader = make_cache(100)
    cache.preload(["a", "b"])
    assert resident(cache) == ["a", "b"]
    with cache.use("a"):
        assert not cache.unload("a")  # in use
    assert cache.unload("a") and resident(cache) == ["b"]
    assert cache.clear() == ["b"] and resident(cache) == []


def test_measured_size_replaces_estimate():
    cache = ModelCache(registry(a=40), budget=100 * MB, loader=lambda s, d: Fake(s),
                       estimate=lambda s, d: 10 * MB, measure=lambda m: 25 * MB)
    with cache.use("a"):
        assert cache.snapshot().used_bytes == 25 * MB


def test_listeners_see_events():
    cache, _ = make_cache(60)
    events = []
    cache.add_listener(lambda event: events.append((event.kind, event.model)))
    with cache.use("a"):
        pass
    with cache.use("a"):
        pass
    with cache.use("b"):  # 40 + 30 > 60: evicts a
        pass
    assert events == [("load", "a"), ("hit", "a"), ("evict", "a"), ("load", "b")]


class Big(torch.nn.Module):
    def __init__(self, mb: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(mb * MB // 4))


def test_memory_returns_to_baseline_after_50_cycles():
    """Real tensors (64 MiB each): eviction must drop every reference so the memory goes back."""
    spec_size = 64
    reg = Registry("t", [ModelSpec(id=f"m{i}", modality="chat", label="m", loader="x:y", params=spec_size * MB)
                         for i in range(2)])
    refs = []

    def load(spec, device):
        model = Big(spec_size)
        refs.append(weakref.ref(model))
        return model

    cache = ModelCache(reg, budget=100 * MB, loader=load, estimate=lambda s, d: s.params)
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    for i in range(50):  # alternate: every request evicts the other model
        with cache.use(f"m{i % 2}") as lease:
            assert lease.model.weight.numel() * 4 == spec_size * MB
    del lease  # the caller's own reference; the cache must hold no other
    cache.clear()
    gc.collect()
    growth = psutil.Process().memory_info().rss - baseline
    assert all(r() is None for r in refs), "an evicted model is still referenced"
    assert cache.snapshot().evictions == 50
    assert growth < 100 * MB, f"RSS grew by {growth / MB:.0f} MiB over 50 load/evict cycles of 64 MiB models"


def test_a_model_kept_loaded_is_never_chosen_for_eviction():
    cache, loader = make_cache(100)
    cache.keep("a")  # loads it now
    assert resident(cache) == ["a"] and cache.kept() == {"a"} and loader.calls == ["a"]
    for model_id in ("b", "c", "d"):  # 40 kept + 50: b and c must go, a stays
        with cache.use(model_id):
            pass
    assert resident(cache) == ["a", "d"]
    assert cache.clear() == ["d"] and resident(cache) == ["a"]  # Free all leaves it too
    assert [m.kept for m in cache.snapshot().models] == [True]


def test_a_load_that_only_kept_models_stand_in_the_way_of_is_refused_at_once():
    cache, _ = make_cache(100, load_timeout=30)
    cache.keep("a")
    cache.keep("b")
    started = time.monotonic()
    with pytest.raises(ModelTooLarge, match=r"d needs about 50.00 MiB, but models kept loaded \(a, b\) hold 70.00 MiB"):
        with cache.use("d"):
            pass
    assert time.monotonic() - started < 10  # not the 30 s a busy cache waits
    cache.keep("b", False)
    with cache.use("d"):  # b is an ordinary idle model again: evicted for d
        pass
    assert resident(cache) == ["a", "d"]


def test_an_explicit_unload_frees_a_kept_model_and_a_failed_keep_keeps_nothing():
    cache, loader = make_cache(100)
    cache.keep("a")
    assert cache.unload("a") and cache.kept() == set() and resident(cache) == []
    loader.fail.add("b")
    with pytest.raises(ModelLoadError):
        cache.keep("b")
    assert cache.kept() == set()
    with pytest.raises(UnknownModelError):
        cache.keep("nope")


def test_swap_does_not_free_a_kept_model_and_last_use_outlives_eviction():
    cache, _ = make_cache(100, strategy="swap")
    cache.keep("a")
    with cache.use("a"):
        pass
    with cache.use("b"):
        pass
    assert resident(cache) == ["a"]
    used = cache.last_used()
    assert set(used) == {"a", "b"} and used["b"] >= used["a"] > time.time() - 60


def test_working_memory_is_admitted_from_the_budget():
    """On a GPU a generation's activations count: idle models are evicted for them, and a generation whose model
    and working memory exceed the budget is refused before it runs (issue 20.6)."""
    from studio.cache import ModelTooLarge
    from studio.devices import working_memory

    cache, _ = make_cache(100)
    with cache.use("b"):
        pass  # idle, 30 MB
    with cache.use("a"):  # 40 MB, pinned
        with cache.working_memory("a", 35 * MB):  # 40 + 30 + 35 > 100 MB: b is evicted for it
            assert [m.id for m in cache.snapshot().models] == ["a"] and cache.snapshot().used_bytes == 75 * MB
        assert cache.snapshot().used_bytes == 40 * MB
        with pytest.raises(ModelTooLarge, match="working memory"):
            with cache.working_memory("a", 61 * MB):
                pass
        with cache.working_memory("a", 0):  # a CPU generation: nothing counted
            pass
    assert working_memory("cpu", 512 * 512, "float16") == 0
    assert working_memory("cuda", 512 * 512, "float16") == 2**30  # SD 1.5 at 512x512: about 1 GiB
    assert working_memory("cuda", 512 * 512, "float32") == 2 * 2**30
