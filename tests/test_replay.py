"""replay: memory policies (reservoir, CBRS, GDumb, balanced), replay batches and weights, state.

Reservoir keeps each seen item with probability K/n (statistical); CBRS never evicts from a class
that is not among the largest; GDumb stays class-balanced; memories hold only seen indices and
never exceed K; the inverse-frequency weights equal their formula; state survives checkpoints.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch
from fedlt_plugins.memory import POLICIES, ClassMemory, draw_replay, inverse_frequency_weights
from fedlt_plugins.replay import Replay
from support.contexts import client_hooks, hook_set, per_batch

import fedlt
from fedlt.driver.runner import Run
from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import ClientHooks
from fedlt.store.checkpoint import load_checkpoint


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def long_tail_stream(counts: list[int], seed: int) -> list[int]:
    """Labels of a shuffled stream holding ``counts[c]`` items of class c."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels).tolist()


def _plugin(**params) -> Replay:
    return hook_set({"name": "replay", **params}).plugins[0]


def _client(state: dict, **params) -> ClientHooks:
    """One client-round of ``replay`` whose per-client state is ``state`` (updated in place)."""
    return client_hooks({"name": "replay", **params}, states={"replay": state})


def _weights(hooks: ClientHooks, ctx: ClientContext, idx: torch.Tensor) -> torch.Tensor | None:
    """The per-sample weights of the rows ``idx`` (stream rows, then replayed rows)."""
    return hooks.client_sample_weights(**per_batch(ctx, torch.zeros(len(idx), 2), ctx.y_train[idx]))


def _ctx(y_train: list[int], online_iter: int | None = 1, seed: int = 0) -> ClientContext:
    y = torch.tensor(y_train)
    idx = torch.arange(len(y_train))
    return ClientContext(
        client_id=0,
        round=1,
        n_rounds=10,
        seed=0,
        num_classes=int(y.max()) + 1,
        config={},
        local_class_counts=np.bincount(y_train),
        global_class_counts=np.bincount(y_train),
        indices=idx,
        labels=y,
        x_train=torch.zeros(len(y_train), 2),
        y_train=y,
        batch_size=4,
        local_epochs=1,
        local_steps=None,
        device=torch.device("cpu"),
        generator=_gen(seed),
        online_iter=online_iter,
    )


# --------------------------------------------------------------------------- policies


def test_reservoir_keeps_every_item_with_probability_k_over_n():
    # Prepare: K = 10 of n = 100 items, 2000 seeded repetitions on one generator.
    k, n, reps = 10, 100, 2000
    g = _gen(0)
    kept = np.zeros(n)
    for _ in range(reps):
        memory = ClassMemory(k, "reservoir")
        memory.extend(range(n), [i % 7 for i in range(n)], g)
        kept[memory.indices] += 1
    freq = kept / reps
    # Assert: each item's frequency is K/n = 0.1 within 4 binomial standard deviations.
    p = k / n
    sigma = math.sqrt(p * (1 - p) / reps)  # 0.0067
    assert np.all(np.abs(freq - p) < 4 * sigma), (freq.min(), freq.max())
    # ... and early items are not favoured over late ones (the first and last 30 agree).
    assert abs(freq[:30].mean() - freq[-30:].mean()) < 4 * sigma / math.sqrt(30) * math.sqrt(2)


def test_reservoir_fills_slots_in_order_then_samples():
    memory = ClassMemory(5, "reservoir")
    for i in range(5):
        assert memory.offer(100 + i, 0, _gen(i)).slot == i  # item n goes to slot n while n < K
    assert memory.indices == [100, 101, 102, 103, 104]
    # Item n = 5: r ~ U{0..5}; stored at slot r iff r < 5, with the overwritten index reported.
    g = _gen(1)
    r = int(torch.randint(6, (1,), generator=_gen(1)))
    adm = memory.offer(105, 1, g)
    if r < 5:
        assert adm.slot == r and adm.evicted_index == 100 + r and memory.indices[r] == 105
    else:
        assert adm.slot is None and 105 not in memory.indices


def test_cbrs_only_evicts_from_a_currently_largest_class():
    # Prepare: a long-tailed stream (400 ... 25 items of 5 classes), K = 50.
    stream = long_tail_stream([400, 200, 100, 50, 25], seed=1)
    memory = ClassMemory(50, "cbrs")
    g = _gen(1)
    cross_evictions = own_replacements = 0
    full_before: set[int] = set()
    for i, y in enumerate(stream):
        largest = memory.largest_classes() if len(memory) == 50 else []
        adm = memory.offer(i, y, g)
        full_now = set(memory.state["full"])
        assert full_before <= full_now, "full classes are sticky"
        full_before = full_now
        if adm.evicted_label is None:
            continue
        if adm.evicted_label != y:
            # A non-full class enters: the victim belongs to a class that was among the largest.
            assert adm.evicted_label in largest
            assert y not in full_now
            cross_evictions += 1
        else:
            # A full class replaces one of its own items (per-class reservoir).
            assert y in full_now
            own_replacements += 1
    assert cross_evictions > 10 and own_replacements > 10  # both branches were exercised
    assert len(memory) == 50


@pytest.mark.parametrize("policy", ["cbrs", "balanced", "gdumb"])
def test_class_balancing_policies_keep_more_minority_items_than_reservoir(policy):
    counts = [400, 200, 100, 50, 25]
    minority = {"reservoir": [], policy: []}
    for seed in range(4):
        stream = long_tail_stream(counts, seed)
        for name in minority:
            memory = ClassMemory(50, name)
            memory.extend(range(len(stream)), stream, _gen(seed))
            minority[name].append(memory.counts.get(3, 0) + memory.counts.get(4, 0))
    # Reservoir keeps about 50 * 75 / 775 = 4.8 of the two tail classes, balancing about 20.
    assert np.mean(minority[policy]) >= 2 * np.mean(minority["reservoir"])
    assert np.mean(minority[policy]) >= 15


@pytest.mark.parametrize("policy", ["gdumb", "balanced"])
@pytest.mark.parametrize(("capacity", "seed"), [(47, 0), (50, 1), (33, 2)])
def test_fair_share_policies_end_class_balanced(policy, capacity, seed):
    # Prepare: 10 long-tailed classes, every one with enough items to reach its share K / 10.
    counts = np.linspace(300, 30, 10).astype(int).tolist()
    stream = long_tail_stream(counts, seed)
    memory = ClassMemory(capacity, policy)
    memory.extend(range(len(stream)), stream, _gen(seed))
    per_class = [memory.counts.get(c, 0) for c in range(10)]
    # Assert: full, and per-class counts differ by at most 1 (floor or ceil of K / 10).
    assert sum(per_class) == capacity
    assert max(per_class) - min(per_class) <= 1, per_class
    assert min(per_class) == capacity // 10


def test_balanced_keeps_a_uniform_sample_of_each_class_gdumb_the_first_arrivals():
    # Two equally frequent classes, K = 20: both policies hold 10 + 10, but GDumb discards every
    # item once its class has its share, while balanced's per-class reservoir keeps replacing.
    mean_position = {"gdumb": [], "balanced": []}
    for seed in range(3):
        stream = long_tail_stream([200, 200], seed)
        for policy in mean_position:
            memory = ClassMemory(20, policy)
            memory.extend(range(len(stream)), stream, _gen(seed))
            assert memory.counts == {0: 10, 1: 10}
            mean_position[policy].append(np.mean(memory.indices))
    assert np.mean(mean_position["gdumb"]) < 40  # the first arrivals (positions ~0-30)
    assert 150 < np.mean(mean_position["balanced"]) < 250  # uniform over 0..399: mean ~200


@pytest.mark.parametrize("policy", POLICIES)
def test_memory_invariants_hold_after_every_item(policy):
    # Prepare: 600 stream items, dataset indices scattered over a 5000-row dataset.
    rng = np.random.default_rng(0)
    label_of = rng.integers(0, 6, size=5000)
    label_of[rng.random(5000) < 0.6] = 0  # a head class
    stream = rng.permutation(5000)[:600].tolist()
    memory = ClassMemory(40, policy)
    g = _gen(0)
    seen: set[int] = set()
    for t, index in enumerate(stream):
        memory.offer(index, int(label_of[index]), g)
        seen.add(index)
        assert len(memory) <= 40
        assert len(memory.indices) == len(memory.labels)
        assert memory.n_seen == t + 1 == sum(memory.state["class_seen"].values())
    # Contents: only seen indices, each once, labelled with its own label; memory is full.
    assert len(memory) == 40
    assert set(memory.indices) <= seen
    assert len(set(memory.indices)) == 40
    assert memory.labels == [int(label_of[i]) for i in memory.indices]
    assert memory.counts == Counter(memory.labels)
    assert memory.state["class_seen"] == Counter(int(label_of[i]) for i in stream)


@pytest.mark.parametrize("policy", POLICIES)
def test_memory_is_a_function_of_the_generator_and_restores_from_state(policy):
    stream = long_tail_stream([100, 40, 10], seed=3)
    a, b, c = (ClassMemory(16, policy) for _ in range(3))
    a.extend(range(150), stream, _gen(5))
    b.extend(range(150), stream, _gen(5))
    assert a.state == b.state
    # Splitting the stream across two wrappers of one state dict (two rounds) changes nothing.
    g = _gen(5)
    c.extend(range(70), stream[:70], g)
    c2 = ClassMemory(16, policy, copy.deepcopy(c.state))
    c2.extend(range(70, 150), stream[70:], g)
    assert c2.state == a.state
    if policy == "reservoir":
        d = ClassMemory(16, policy)
        d.extend(range(150), stream, _gen(6))
        assert d.indices != a.indices


def test_invalid_memory_states_and_parameters_are_refused():
    with pytest.raises(ValueError, match="at most 2"):
        ClassMemory(2, "reservoir", {"indices": [1, 2, 3], "labels": [0, 0, 0]})
    with pytest.raises(ValueError, match="policy must be one of"):
        ClassMemory(2, "fifo")  # type: ignore[arg-type]
    with pytest.raises(fedlt.ScenarioError, match="memory_size"):
        _plugin(memory_size=0)
    with pytest.raises(fedlt.ScenarioError, match="policy"):
        _plugin(policy="fifo")


# --------------------------------------------------------------------------- replay batches


def test_inverse_frequency_weights_on_a_hand_worked_memory():
    # Memory classes [0, 0, 0, 1]: raw weights 1/3 for class 0 and 1 for class 1.
    memory = [0, 0, 0, 1]
    torch.testing.assert_close(
        inverse_frequency_weights([0, 0, 0, 1], memory), torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0])
    )  # mean of [1/3, 1/3, 1/3, 1] is 1/2
    torch.testing.assert_close(
        inverse_frequency_weights([1, 0], memory), torch.tensor([1.5, 0.5])
    )  # [1, 1/3] / (2/3)


def test_replay_hooks_append_memory_rows_and_weight_them():
    # Prepare: dataset labels; memory slots hold indices 10..13 with classes [0, 0, 0, 1].
    y_train = [0] * 10 + [0, 0, 0, 1] + [1] * 6
    ctx = _ctx(y_train)
    state = {"indices": [10, 11, 12, 13], "labels": [0, 0, 0, 1], "n_seen": 4, "class_seen": {0: 3, 1: 1}}
    hooks = _client(state, replay_ratio=1.0, reweight="inverse-frequency")
    batch = torch.tensor([14, 15, 16, 17])
    # Execute: 4 stream rows, ratio 1 -> 4 replayed rows (all of memory, no repeats).
    extra = hooks.client_replay_indices(batch=batch, ctx=ctx)
    assert sorted(extra.tolist()) == [10, 11, 12, 13]
    w = _weights(hooks, ctx, torch.cat([batch, extra]))
    # Assert: stream rows weigh 1; replayed rows 2/3 (class 0) and 2 (class 1), mean 1.
    expected = [1.0] * 4 + [2.0 if i == 13 else 2 / 3 for i in extra.tolist()]
    torch.testing.assert_close(w, torch.tensor(expected))
    assert w[4:].mean().item() == pytest.approx(1.0)
    # Without reweighting no weights are returned; rows are still appended.
    plain = _client(state, replay_ratio=1.0)
    extra = plain.client_replay_indices(batch=batch, ctx=ctx)
    assert extra.numel() == 4
    assert _weights(plain, ctx, torch.cat([batch, extra])) is None


@pytest.mark.parametrize(
    ("ratio", "batch_len", "n_expected"),
    [(0.5, 4, 2), (0.5, 5, 3), (0.5, 3, 2), (0.5, 1, 1), (0.25, 1, 0), (1.0, 10, 4), (0.0, 4, 0)],
)
def test_replay_count_is_rounded_ratio_capped_by_memory(ratio, batch_len, n_expected):
    # Memory slots 0..3 hold classes [0, 0, 0, 1]: inverse-frequency raw weights 1/3 and 1.
    ctx = _ctx([0, 0, 0, 1] + [0] * 10)
    state = {"indices": [0, 1, 2, 3], "labels": [0, 0, 0, 1]}
    hooks = _client(state, replay_ratio=ratio, reweight="inverse-frequency")
    batch = torch.arange(4, 4 + batch_len)
    extra = hooks.client_replay_indices(batch=batch, ctx=ctx)
    n = 0 if extra is None else extra.numel()
    assert n == n_expected
    if n:
        assert len(set(extra.tolist())) == n and set(extra.tolist()) <= {0, 1, 2, 3}
    w = _weights(hooks, ctx, batch if extra is None else torch.cat([batch, extra]))
    assert (w is None) == (n == 0)
    if n:
        # The weights cover exactly the replayed rows (the last n): 1 on the stream rows, and
        # (1 / n_mem[y]) / mean over the replayed rows, with n_mem = [3, 1].
        raw = 1.0 / torch.tensor([3.0, 1.0])[ctx.y_train[extra]]
        torch.testing.assert_close(w, torch.cat([torch.ones(batch_len), raw / raw.mean()]))


def test_empty_memory_and_offline_scenarios_replay_nothing():
    spec = {"reweight": "inverse-frequency"}
    online, state = _ctx([0, 1, 0, 1]), {}
    hooks = _client(state, **spec)
    assert hooks.client_replay_indices(batch=torch.arange(4), ctx=online) is None
    assert _weights(hooks, online, torch.arange(4)) is None
    # Offline (no stream): nothing is drawn, stored or weighted, and the state stays empty.
    offline, state = _ctx([0, 1, 0, 1], online_iter=None), {}
    hooks = _client(state, **spec)
    before = offline.generator.get_state()
    assert hooks.client_replay_indices(batch=torch.arange(4), ctx=offline) is None
    hooks.client_update_memory(batch=torch.arange(4), ctx=offline)
    assert _weights(hooks, offline, torch.arange(4)) is None
    assert state == {}
    assert torch.equal(offline.generator.get_state(), before)


def test_inverse_frequency_sampling_draws_each_class_equally_often():
    labels = [0] * 9 + [1]  # slot 9 is the only class-1 item
    reps = 2000
    hits = {"uniform": 0, "inverse-frequency": 0}
    for sampling in hits:
        g = _gen(2)
        hits[sampling] = sum(int(draw_replay(labels, 1, sampling, g)) == 9 for _ in range(reps))
    # p(slot 9) = (1/1) / (9 * 1/9 + 1/1) = 1/2 under inverse frequency, 1/10 uniformly.
    for sampling, p in (("uniform", 0.1), ("inverse-frequency", 0.5)):
        sigma = math.sqrt(p * (1 - p) / reps)
        assert abs(hits[sampling] / reps - p) < 4 * sigma
    slots = draw_replay(labels, 5, "inverse-frequency", _gen(3))
    assert len(set(slots.tolist())) == 5  # without replacement


def test_update_memory_hook_applies_the_policy_in_stream_order():
    y_train = long_tail_stream([60, 20, 5], seed=4)
    ctx, state = _ctx(y_train, seed=9), {}
    hooks = _client(state, memory_size=12, policy="cbrs")
    for start in range(0, 85, 4):
        hooks.client_update_memory(batch=torch.arange(start, min(start + 4, 85)), ctx=ctx)
    reference = ClassMemory(12, "cbrs")
    reference.extend(range(85), y_train, _gen(9))
    assert state == reference.state
    assert state["n_seen"] == 85 and len(state["indices"]) == 12


# --------------------------------------------------------------------------- end to end


def _stream_scenario(tiny, **replay):
    tiny["stream"] = {"kind": "si-blurry", "n_tasks": 3, "samples_per_round": 48, "online_iter": 2}
    tiny["federation"].update(rounds=3, eval_every=3)
    tiny["plugins"] = [{"name": "replay", **replay}] if replay else []
    return tiny


def test_stream_run_memory_state_checkpoint_and_resume(tiny, tmp_path, monkeypatch, interrupted_run):
    # Spy on the replay hook to see the rows the engine received (the marker must be kept).
    replayed: list[int] = []
    original = Replay.client_replay_indices

    def spy(self, batch, ctx, state):
        out = original(self, batch=batch, ctx=ctx, state=state)
        replayed.append(0 if out is None else out.numel())
        return out

    spy.fedlt_impl = original.fedlt_impl  # type: ignore[attr-defined]
    monkeypatch.setattr(Replay, "client_replay_indices", spy)
    scenario = _stream_scenario(
        tiny, memory_size=24, policy="cbrs", replay_ratio=0.5, reweight="inverse-frequency"
    )
    run = Run.create(fedlt.load_scenario(scenario), tmp_path / "full")
    full = run.execute()
    # Replay happened: no rows at a client's first step, 16 per 32-row batch once memory holds 16.
    assert replayed[0] == 0 and max(replayed) == 16
    # Every client's memory holds only indices it has consumed, each offered exactly once.
    assert run.client_states
    for client, states in run.client_states.items():
        mem = states["replay"]
        consumed = run.views.seen_indices(client)  # what the client has read of its stream
        assert mem["n_seen"] == len(consumed) > 0
        assert 0 < len(mem["indices"]) <= 24
        assert set(mem["indices"]) <= set(consumed.tolist())
        assert mem["labels"] == run.data.y_train[mem["indices"]].tolist()
        assert mem["class_seen"] == Counter(run.data.y_train_np[consumed].tolist())
    # The checkpoint holds the same per-client state (round trip through torch.save).
    assert load_checkpoint(tmp_path / "full")["client_states"] == run.client_states

    # Resume: stop after round 2, continue, and get the uninterrupted run's numbers and memories.
    interrupted_run(scenario, tmp_path / "cut", after=2)
    resumed = fedlt.resume(tmp_path / "cut")
    assert resumed["final"] == full["final"]
    assert load_checkpoint(tmp_path / "cut")["client_states"] == run.client_states


def test_offline_run_with_replay_is_refused(tiny, tmp_path):
    # Offline there is nothing to remember: refused before anything runs, not silently a no-op.
    tiny["plugins"] = [{"name": "replay", "reweight": "inverse-frequency"}]
    with pytest.raises(fedlt.ScenarioError, match=r"plugins\[0\]\.name.*continual scenario"):
        fedlt.run(tiny, out=tmp_path / "replay")
    assert not (tmp_path / "replay" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------- evict-largest (CLIB / Si-Blurry)


def test_evict_largest_on_a_hand_worked_sequence():
    # The CLIB / Si-Blurry code's GDumb and RM memory rule, K = 3, classes a = 0, b = 1, c = 2.
    a, b, c = 0, 1, 2
    memory = ClassMemory(3, "evict-largest")
    g = _gen(0)
    # 1. Not full: store in order. Memory [0:a, 1:a, 2:b].
    for index, label in ((0, a), (1, a), (2, b)):
        assert memory.offer(index, label, g).slot == index
    # 2. 3:a. Counting the newcomer: a 3, b 1 -> evict an a; the newcomer is stored although its
    #    class is the largest (GDumb's fair-share rule would discard it: 2 >= 3 / 2).
    got = memory.offer(3, a, g)
    assert got.slot in (0, 1) and got.evicted_label == a and got.evicted_index == got.slot
    assert memory.counts == {a: 2, b: 1}
    assert sorted(memory.indices) == sorted([2, 3, 1 - got.slot])
    # 3. 4:c (new class, nothing of it stored). a 2, b 1, c 1 -> evict an a. Memory a 1, b 1, c 1.
    got = memory.offer(4, c, g)
    assert got.evicted_label == a and memory.counts == {a: 1, b: 1, c: 1}
    slot_c = got.slot
    # 4. 5:c. a 1, b 1, c 2 -> c is the only largest: 4 (the only c) is overwritten, in its slot.
    got = memory.offer(5, c, g)
    assert (got.slot, got.evicted_index, got.evicted_label) == (slot_c, 4, c)
    # 5. 6:b. a 1, b 2, c 1 -> b's only item (2, slot 2) is overwritten.
    got = memory.offer(6, b, g)
    assert (got.slot, got.evicted_index, got.evicted_label) == (2, 2, b)
    # Contents: one a (one of 0, 1, 3), 6:b and 5:c.
    assert memory.counts == {a: 1, b: 1, c: 1}
    kept_a = [i for i, y in zip(memory.indices, memory.labels, strict=True) if y == a]
    assert len(kept_a) == 1 and kept_a[0] in (0, 1, 3)
    assert sorted(i for i in memory.indices if i != kept_a[0]) == [5, 6]
    # GDumb on the same arrivals discards 3:a (step 2): its memory keeps 0 and 1.
    gdumb = ClassMemory(3, "gdumb")
    gdumb.extend([0, 1, 2, 3], [a, a, b, a], _gen(0))
    assert sorted(gdumb.indices) == [0, 1, 2]


def test_evict_largest_draws_uniformly_among_tied_largest_classes():
    # Memory [a, b] (K = 2) full; a newcomer of a third class ties a and b at 1: each is evicted
    # about half the time (the newcomer's own class holds nothing and cannot be drawn).
    evicted = Counter()
    for seed in range(400):
        memory = ClassMemory(2, "evict-largest")
        g = _gen(seed)
        memory.extend([0, 1], [0, 1], g)
        evicted[memory.offer(2, 2, g).evicted_label] += 1
    assert set(evicted) == {0, 1}
    assert abs(evicted[0] - 200) < 4 * math.sqrt(400 * 0.25)  # binomial(400, 1/2), 4 sigma


def test_stream_records_the_memory_class_make_up_at_every_evaluation(tiny, tmp_path):
    scenario = _stream_scenario(tiny, memory_size=24, policy="evict-largest")
    run = Run.create(fedlt.load_scenario(scenario), tmp_path / "run")
    run.execute()
    records = fedlt.history(tmp_path / "run")
    made_up = [r["memory_class_counts"]["replay"] for r in records if "anytime_accuracy" in r]
    assert made_up and len(made_up) == len(records)
    for counts in made_up:
        assert all(len(v) == run.data.num_classes and 0 < sum(v) <= 24 for v in counts.values())
    # The last record is what the memories hold at the end, counted here from their labels.
    expected = {
        str(k): np.bincount(s["replay"]["labels"], minlength=run.data.num_classes).tolist()
        for k, s in run.client_states.items()
    }
    assert made_up[-1] == expected
