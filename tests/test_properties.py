"""Property tests of the whole memory: random sequences of public-API calls against a model.

A hypothesis ``RuleBasedStateMachine`` drives one ``TensorDictReplayBuffer(HippoStorage,
HippoWriter, HippoSampler)`` through random sequences of ``extend`` (flat ``[N]`` and
``[env, time]`` batches, with ``done`` / ``is_init`` / trajectory ids, episodes spanning
batches), ``add``, ``sample`` (mixture ratios 0 to 1, ``set_query`` with embeddings, sampled
keys or windows), ``update_priority``, consolidation, ``storage.refresh_keys``, ``empty`` and
save / load round trips (``rb.dumps`` + ``loads`` into a fresh buffer, and
``torchrl_hippo.hub.save_memory`` + ``load_memory``, which also rebuilds the encoder), under
fifo or importance forgetting and with eager or deferred keys.

Every row carries a unique ``"uid"`` entry. A plain-Python model replays the writes: which
episode and step each uid belongs to, which episode ids the memory hands out, where each uid
was written, and, for fifo, where the ring puts it. After every call the memory must agree
with the model:

- every stored row belongs to exactly one episode: its ``("hippo", "episode")`` id sits in
  exactly one slot of the episode table, and the table holds no other episode than those with
  stored rows and those still running;
- the table's ``rows`` / ``length`` / ``return`` / ``done`` match the model, and the stored
  steps of an episode are a run of consecutive steps whose ``prev`` links follow it;
- nothing is lost except by the forgetting policy: fifo keeps exactly the last ``max_size``
  rows written; importance evicts whole episodes only (running ones last, and only as many as
  the write needs, plus the ``evict_fraction`` headroom);
- keys are finite unit vectors and, while their window is stored and the encoder unchanged,
  equal the target encoder's key of that window;
- sampled indices are in range and point at stored rows, the sampled rows equal the stored
  rows, ``priority_weight`` is finite and in ``(0, 1]``, exactly ``round(B * mixture_ratio)``
  items are semantic, and each semantic item is among the ``top_k`` stored keys nearest to one
  of the queries;
- a reloaded memory has the same state and draws the same batches from the same seed.

The suite runs 40 random sequences of up to 20 calls; ``HIPPO_PROPERTY_EXAMPLES`` and
``HIPPO_PROPERTY_STEPS`` (environment variables) ask for more.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
import torch
from conftest import assert_same_state
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from tensordict import TensorDict
from torchrl.data import TensorDictReplayBuffer

from torchrl_hippo import DualEncoder, HippoSampler, HippoStorage, HippoWriter
from torchrl_hippo.consolidation import Consolidator
from torchrl_hippo.hub import load_memory, save_memory

OBS_DIM, ACT_DIM, EMBED_DIM, WINDOW = 3, 2, 8, 3
MAX_ENVS = 3
# Reloaded buffers are checked against the saved one draw for draw, from this seed.
_DRAW_SEED = 1234


@dataclass
class Episode:
    """What the model knows of one episode."""

    id: int
    uids: list[int] = field(default_factory=list)  # one per step, in order
    rows: list[int] = field(default_factory=list)  # storage row each step went to (-1: none)
    ret: float = 0.0
    done: bool = False


class MemoryModel:
    """Replays writes in plain Python: episodes, ids, and which uid each storage row holds."""

    def __init__(self, capacity: int, forgetting: str) -> None:
        self.capacity = capacity
        self.forgetting = forgetting
        self.reset()

    def reset(self) -> None:
        self.next_uid = 0
        self.next_id = 0
        self.episodes: dict[int, Episode] = {}
        self.open: dict[int, int] = {}  # stream key -> episode id, while the episode runs
        self.of_uid: dict[int, tuple[int, int]] = {}  # uid -> (episode id, step)
        self.row_uid: dict[int, int] = {}  # storage row -> uid stored there
        self.high = 0  # rows ever used (len(storage))
        self.cursor = 0  # fifo ring position
        self.write_count = 0

    def new_uids(self, n: int) -> list[int]:
        uids = list(range(self.next_uid, self.next_uid + n))
        self.next_uid += n
        return uids

    def continued(self, rows: list[dict]) -> set[int]:
        """The running episodes this batch continues (its streams' first rows, unless is_init)."""
        seen, out = set(), set()
        for row in rows:
            key = row["stream"]
            if key in seen:
                continue
            seen.add(key)
            if key in self.open and not row["init"]:
                out.add(self.open[key])
        return out

    def write(self, rows: list[dict]) -> None:
        """Rows in sequence order, each with stream, init, done, reward, uid and row (-1)."""
        for row in rows:
            key = row["stream"]
            episode_id = self.open.get(key)
            if episode_id is None or row["init"]:
                if episode_id is not None:
                    self.episodes[episode_id].done = True  # abandoned
                episode_id = self.next_id
                self.next_id += 1
                self.episodes[episode_id] = Episode(episode_id)
                self.open[key] = episode_id
            episode = self.episodes[episode_id]
            self.of_uid[row["uid"]] = (episode_id, len(episode.uids))
            episode.uids.append(row["uid"])
            episode.rows.append(row["row"])
            episode.ret += row["reward"]
            if row["row"] >= 0:
                self.row_uid[row["row"]] = row["uid"]
                self.high = max(self.high, row["row"] + 1)
                self.write_count += 1
            if row["done"]:
                episode.done = True
                del self.open[key]

    def stored_by_episode(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for uid in self.row_uid.values():
            out.setdefault(self.of_uid[uid][0], []).append(uid)
        return out


def _build_buffer(encoder, *, capacity, forgetting, defer_keys, evict_fraction):
    return TensorDictReplayBuffer(
        storage=HippoStorage(capacity),
        writer=HippoWriter(
            encoder, forgetting=forgetting, defer_keys=defer_keys, evict_fraction=evict_fraction
        ),
        sampler=HippoSampler(mixture_ratio=0.5, top_k=2, temperature=0.5),
    )


def _stored(rb) -> tuple[torch.Tensor, TensorDict | None]:
    storage = rb.storage
    if not storage.initialized:
        return torch.zeros(0, dtype=torch.int64), None
    rows = storage.valid_mask().nonzero().squeeze(1)
    return rows, (storage.get(rows) if rows.numel() else None)


def _storage_state(storage: HippoStorage) -> dict:
    """``storage.state_dict()`` without what is unspecified: rows past ``len(storage)``, and
    the unused tails of the free-row and free-slot stacks."""
    state = storage.state_dict()
    if state["_storage"] is not None and not isinstance(state["_storage"], torch.Tensor):
        rows = TensorDict(state["_storage"], batch_size=[storage.max_size])
        state["_storage"] = rows[: len(storage)].to_dict()
    book = state["hippo"]
    for stack, count in (("free_rows", "num_free_rows"), ("free_slots", "num_free_slots")):
        if book.get(stack) is not None:
            book[stack] = book[stack][: book[count]]
    return state


class MemoryMachine(RuleBasedStateMachine):
    """The memory under random public-API calls, checked against :class:`MemoryModel`."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="hippo-props-")
        self.rb = None

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    _LAYOUTS = st.sampled_from(["flat", "flat_traj", "env", "env_traj"])
    _P_DONE = st.sampled_from([0.0, 0.2, 0.5])

    @initialize(
        capacity=st.sampled_from([5, 9, 16]),
        forgetting=st.sampled_from(["fifo", "importance"]),
        defer_keys=st.booleans(),
        evict_fraction=st.sampled_from([0.0, 0.2]),
        data=st.data(),
        layout=_LAYOUTS,
        p_done=_P_DONE,
    )
    def build(self, capacity, forgetting, defer_keys, evict_fraction, data, layout, p_done):
        """A memory, and a first write into it."""
        torch.manual_seed(0)
        self.encoder = DualEncoder(OBS_DIM, ACT_DIM, EMBED_DIM, window=WINDOW, hidden_dim=16)
        self.options = dict(
            capacity=capacity,
            forgetting=forgetting,
            defer_keys=defer_keys,
            evict_fraction=evict_fraction,
        )
        self.rb = _build_buffer(self.encoder, **self.options)
        self.consolidator = self._consolidator()
        self.model = MemoryModel(capacity, forgetting)
        self.traj = {}  # env -> its current trajectory id (traj layouts)
        self.next_traj = 100  # apart from env indices, the keys of layouts without traj ids
        self.query = None  # what set_query was given, to recompute the queries
        self._extend(data, layout, p_done)

    def _consolidator(self) -> Consolidator:
        return Consolidator(self.encoder, reward_weight=0.5, temperature=0.2, lr=1e-2, momentum=0.5)

    # ------------------------------------------------------------------ writes
    def _traj_id(self, env: int) -> int:
        if env not in self.traj:
            self.traj[env] = self.next_traj
            self.next_traj += 1
        return self.traj[env]

    # Writes are what the other calls act on: two rules, so they are drawn twice as often.
    @rule(data=st.data(), layout=_LAYOUTS, p_done=_P_DONE)
    def extend(self, data, layout, p_done):
        self._extend(data, layout, p_done)

    @rule(data=st.data(), layout=_LAYOUTS, p_done=_P_DONE)
    def extend_more(self, data, layout, p_done):
        self._extend(data, layout, p_done)

    def _extend(self, data, layout, p_done):
        envs = 1 if layout == "flat" else data.draw(st.integers(1, MAX_ENVS), label="envs")
        time = data.draw(st.integers(1, 10 if layout.startswith("env") else 16), label="time")
        n = envs * time if layout != "flat_traj" else time
        done = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="done")
        done = [d and (p_done > 0) for d in done]
        if p_done == 0.2:  # fewer ends: long episodes that span batches
            done = [d and (i % 3 == 0) for i, d in enumerate(done)]
        init = data.draw(
            st.lists(st.sampled_from([False] * 7 + [True]), min_size=n, max_size=n), label="init"
        )
        reward = data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n), label="reward")
        reward = [r / 2 for r in reward]
        # Streams: the key the writer tells episodes apart by (see the writer's segmentation).
        if layout == "flat":
            streams = [0] * n
        elif layout == "env":
            streams = [i // time for i in range(n)]
        else:
            if layout == "flat_traj":
                env_of = data.draw(
                    st.lists(st.integers(0, envs - 1), min_size=n, max_size=n), label="env_of"
                )
            else:
                env_of = [i // time for i in range(n)]
            streams = []
            for i, env in enumerate(env_of):
                streams.append(self._traj_id(env))
                if done[i]:  # a collector names the next episode anew
                    self.traj[env] = self.next_traj
                    self.next_traj += 1
        uids = self.model.new_uids(n)
        g = torch.Generator().manual_seed(uids[0])
        td = TensorDict(
            {
                "uid": torch.tensor(uids),
                "observation": torch.randn(n, OBS_DIM, generator=g),
                "action": torch.randn(n, ACT_DIM, generator=g),
                "is_init": torch.tensor(init).reshape(n, 1),
                "next": {
                    "reward": torch.tensor(reward).reshape(n, 1),
                    "done": torch.tensor(done).reshape(n, 1),
                },
            },
            batch_size=[n],
        )
        if layout.endswith("traj"):
            td["collector", "traj_ids"] = torch.tensor(streams)
        if layout.startswith("env"):
            td = td.reshape(envs, time)
        # Sequence order: the writer sorts an interleaved flat batch by trajectory id (stably).
        order = list(range(n))
        if layout == "flat_traj":
            order = sorted(order, key=lambda i: streams[i])
        rows = [
            {
                "stream": streams[i],
                "init": init[i],
                "done": done[i],
                "reward": reward[i],
                "uid": uids[i],
            }
            for i in order
        ]
        use_add = n == 1 and layout == "flat" and data.draw(st.booleans(), label="add")
        self._write(td, rows, order, use_add)

    def _write(self, td, rows, order, use_add):
        model, rb = self.model, self.rb
        n, cap = len(rows), model.capacity
        n_write = min(n, cap)
        before = dict(model.row_uid)
        free_before = model.high - len(before)
        fresh = min(cap - model.high, n_write)
        need = n_write - fresh
        continued = model.continued(rows)
        done_before = {e: ep.done for e, ep in model.episodes.items()}
        if use_add:
            index = torch.as_tensor(rb.add(td[0])).reshape(1)
        else:
            index = rb.extend(td)
        assert index.shape == td.shape
        index = index.reshape(-1).tolist()
        # A batch larger than the memory keeps its last rows (in sequence order).
        seq_index = [index[i] for i in order]
        assert seq_index[: n - n_write] == [-1] * (n - n_write)
        written = seq_index[n - n_write :]
        assert len(set(written)) == n_write and all(0 <= r < cap for r in written)
        event(f"extend: {'batch larger than the memory' if n > cap else 'fits'}")
        if model.forgetting == "fifo":
            if model.high == cap and n_write:
                event("extend: fifo overwrites")
            assert written == [(model.cursor + j) % cap for j in range(n_write)]
            model.cursor = (model.cursor + n_write) % cap
        else:
            lost = self._check_eviction(before, written, need, free_before, continued, done_before)
            model.row_uid = {row: uid for row, uid in before.items() if uid not in lost}
        for row, value in zip(rows, seq_index):
            row["row"] = value
        model.write(rows)

    def _check_eviction(self, before, written, need, free_before, continued, done_before):
        """Importance forgetting: what left the memory left it by the policy's rules only.

        Returns the uids evicted by this write.
        """
        model, storage = self.model, self.rb.storage
        slot = storage.row_slot
        uid_col = storage._storage.get("uid")
        lost = {
            uid for row, uid in before.items() if int(slot[row]) < 0 or int(uid_col[row]) != uid
        }
        by_episode: dict[int, list[int]] = {}
        for uid in before.values():
            by_episode.setdefault(model.of_uid[uid][0], []).append(uid)
        evicted = {model.of_uid[uid][0] for uid in lost}
        if evicted:
            running = any(not done_before[e] for e in evicted)
            event(f"extend: importance evicts {'a running' if running else 'finished'} episode")
        # Whole episodes only: an evicted episode lost every row it had.
        for episode_id in evicted:
            assert set(by_episode[episode_id]) <= lost, f"episode {episode_id} half evicted"
        # Rows written were free: never used, freed before, or freed now.
        for row in written:
            assert row >= model.high or row not in before or before[row] in lost
        if need <= free_before:
            assert not lost, "evicted although free rows were enough"
            return lost
        headroom = math.ceil(self.rb.writer.evict_fraction * model.capacity)
        target = min(need - free_before + headroom, len(before))
        assert len(lost) >= target
        if evicted:  # no more than needed: the last episode evicted was still required
            largest = max(len(by_episode[e]) for e in evicted)
            assert len(lost) - largest < target
        # Running episodes go last, and the ones this batch continues after them.
        alive = set(by_episode)
        if any(not done_before[e] for e in evicted):
            assert {e for e in alive if done_before[e]} <= evicted
        if evicted & continued:
            assert alive - continued <= evicted
        return lost

    # ------------------------------------------------------------------ reads
    def _queries(self) -> torch.Tensor | None:
        """The normalised queries the sampler should use (``None``: default anchors)."""
        query = self.query
        if query is None:
            return None
        if isinstance(query, torch.Tensor):
            keys = query
        elif ("hippo", "key") in query.keys(True, True):
            keys = query["hippo", "key"]
        else:
            with torch.no_grad():
                keys = self.encoder(query.copy())["hippo", "key"]
        return torch.nn.functional.normalize(keys.reshape(-1, EMBED_DIM).float(), dim=-1)

    @rule(
        mixture_ratio=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
        batch_size=st.integers(1, 12),
        top_k=st.integers(1, 4),
    )
    def sample(self, mixture_ratio, batch_size, top_k):
        rb, model = self.rb, self.model
        rb.sampler.mixture_ratio = mixture_ratio
        rb.sampler.top_k = top_k
        n_valid = len(model.row_uid)
        n_sem = round(batch_size * mixture_ratio)
        if n_valid == 0:
            event("sample: empty memory")
            with pytest.raises(RuntimeError, match="empty memory"):
                rb.sample(batch_size)
            return
        if n_sem and top_k > n_valid:
            event("sample: top_k larger than the memory")
            with pytest.raises(ValueError, match=f"top_k={top_k}"):
                rb.sample(batch_size)
            return
        storage = rb.storage
        access_before = storage.episodes["access"].clone()
        batch = rb.sample(batch_size)
        index = batch["index"]
        assert index.shape == (batch_size,)
        assert bool(((index >= 0) & (index < len(storage))).all())
        assert bool((storage.row_slot[index] >= 0).all()), "a free row was sampled"
        # The sampled rows are the stored rows.
        expected = storage.get(index)
        for key in expected.keys(True, True):
            torch.testing.assert_close(
                batch[key], expected[key], rtol=0, atol=0, equal_nan=True, msg=str(key)
            )
        assert batch["uid"].tolist() == [model.row_uid[r] for r in index.tolist()]
        weight = batch["priority_weight"]
        assert bool(torch.isfinite(weight).all()) and bool((weight > 0).all())
        assert bool((weight <= 1 + 1e-5).all())
        semantic = batch["hippo", "semantic"]
        assert int(semantic.sum()) == n_sem
        similarity = batch["hippo", "similarity"]
        assert bool(torch.isfinite(similarity[semantic]).all())
        assert bool(torch.isnan(similarity[~semantic]).all())
        # Each sampled row counts one access for its episode.
        slots = storage.row_slot[index]
        delta = storage.episodes["access"] - access_before
        assert delta.tolist() == torch.bincount(slots, minlength=delta.numel()).tolist()
        queries = self._queries()
        kind = "uniform only" if not n_sem else "default anchors" if queries is None else "queries"
        event(f"sample: drawn ({kind})")
        if n_sem and queries is not None:
            self._check_retrieval(queries, index[semantic], similarity[semantic], top_k)

    def _check_retrieval(self, queries, rows, similarity, top_k):
        """Each semantic item is among the top_k stored keys of a query, with its score."""
        storage = self.rb.storage
        valid = storage.valid_mask()
        scores = queries @ storage.keys.float().T  # [Q, len]
        scores[:, ~valid] = -torch.inf
        for row, sim in zip(rows.tolist(), similarity.tolist()):
            own = scores[:, row]
            match = (own - sim).abs() <= 1e-4
            assert bool(match.any()), f"row {row}: similarity {sim} is no query's score"
            better = (scores[match] > sim + 1e-4).sum(1)
            assert int(better.min()) < top_k, f"row {row} is not in the top {top_k}"

    @rule(data=st.data(), kind=st.sampled_from(["none", "embeddings", "keys", "windows"]))
    def set_query(self, data, kind):
        storage = self.rb.storage
        stored = len(self.model.row_uid) > 0
        if kind == "none" or (kind in ("keys", "windows") and not stored):
            query = None
        elif kind == "embeddings":
            q = data.draw(st.integers(1, 3), label="num_queries")
            query = torch.randn(q, EMBED_DIM)
        else:
            rows = torch.tensor(sorted(self.model.row_uid))[:3]
            if kind == "keys":
                storage.encode_pending()
                query = storage.get(rows).select(("hippo", "key"))
            else:
                query = storage.gather_windows(rows, WINDOW)
        self.rb.sampler.set_query(query)
        self.query = query
        # Draw with the new queries at once (more draws follow from the sample rule).
        self.sample(
            mixture_ratio=data.draw(st.sampled_from([0.5, 1.0]), label="mixture_ratio"),
            batch_size=data.draw(st.integers(1, 12), label="batch_size"),
            top_k=data.draw(st.integers(1, 4), label="top_k"),
        )

    @precondition(lambda self: self.rb is not None and len(self.model.row_uid) > 0)
    @rule(data=st.data())
    def update_priority(self, data):
        rows = sorted(self.model.row_uid)
        picked = data.draw(st.lists(st.sampled_from(rows), min_size=1, max_size=5), label="rows")
        priority = data.draw(
            st.lists(st.floats(0, 10), min_size=len(picked), max_size=len(picked)),
            label="priority",
        )
        self.rb.update_priority(torch.tensor(picked), torch.tensor(priority))

    # ------------------------------------------------------------------ consolidation, keys
    @rule(steps=st.integers(1, 2), batch_size=st.sampled_from([2, 4]))
    def consolidate(self, steps, batch_size):
        rb = self.rb
        finished = sum(
            1
            for uid in self.model.row_uid.values()
            if self.model.episodes[self.model.of_uid[uid][0]].done
        )
        if not self.model.row_uid:
            with pytest.raises(RuntimeError, match="empty memory"):
                self.consolidator.consolidate(rb, steps, batch_size)
            return
        if finished == 0:
            with pytest.raises(RuntimeError, match="no finished episode"):
                self.consolidator.consolidate(rb, steps, batch_size)
            return
        if finished < batch_size:
            with pytest.raises(ValueError, match=f"batch_size={batch_size}"):
                self.consolidator.consolidate(rb, steps, batch_size)
            return
        version = int(self.encoder.version)
        event("consolidate: ran")
        out = self.consolidator.consolidate(rb, steps, batch_size)
        assert int(out["steps"]) == steps and int(out["version"]) == version + steps
        assert bool(torch.isfinite(out["loss_contrastive"]))
        _, stored = _stored(rb)
        # Every stored key was re-encoded by the new target.
        assert bool((stored["hippo", "key_version"] == version + steps).all())
        assert float(out["key_staleness"]) == 0.0

    @precondition(lambda self: self.rb is not None and len(self.model.row_uid) > 0)
    @rule(data=st.data(), everything=st.booleans())
    def refresh_keys(self, data, everything):
        storage = self.rb.storage
        version = int(self.encoder.version)
        if everything:
            rows = None
            expect = sorted(self.model.row_uid)
        else:
            # Any rows below len(storage), free ones included (they are skipped).
            rows = data.draw(
                st.lists(st.integers(0, len(storage) - 1), min_size=1, max_size=6, unique=True),
                label="rows",
            )
            expect = sorted(r for r in rows if r in self.model.row_uid)
            rows = torch.tensor(rows)
        assert storage.refresh_keys(rows) == len(expect)
        versions = storage._storage.get(("hippo", "key_version"))
        assert versions[expect].tolist() == [version] * len(expect)

    # ------------------------------------------------------------------ life cycle
    @rule()
    def save_and_load(self):
        """``rb.dumps`` then a fresh buffer's ``loads``: the same memory, and it goes on."""
        rb = self.rb
        path = tempfile.mkdtemp(dir=self.tmp)
        rb.dumps(path)
        clone = _build_buffer(self.encoder, **self.options)
        clone.loads(path)
        assert_same_state(_storage_state(rb.storage), _storage_state(clone.storage), "storage")
        assert_same_state(rb.writer.state_dict(), clone.writer.state_dict(), "writer")
        assert_same_state(rb.sampler.state_dict(), clone.sampler.state_dict(), "sampler")
        assert len(clone) == len(rb)
        if self.model.row_uid:  # uniform draws replay identically
            for buffer in (rb, clone):
                buffer.sampler.mixture_ratio = 0.0
            draws = []
            for buffer in (rb, clone):
                torch.manual_seed(_DRAW_SEED)
                draws.append(buffer.sample(6)["index"])
            assert draws[0].tolist() == draws[1].tolist()
        self.rb = clone
        shutil.rmtree(path, ignore_errors=True)

    @rule()
    def save_and_load_memory(self):
        """``hub.save_memory`` then ``hub.load_memory``: a new buffer and encoder, same memory."""
        rb = self.rb
        path = save_memory(rb, f"{tempfile.mkdtemp(dir=self.tmp)}/memory")
        loaded = load_memory(path)
        encoder = loaded.writer.encoder
        assert encoder is not self.encoder
        assert_same_state(self.encoder.state_dict(), encoder.state_dict(), "encoder")
        assert_same_state(_storage_state(rb.storage), _storage_state(loaded.storage), "storage")
        assert_same_state(rb.writer.state_dict(), loaded.writer.state_dict(), "writer")
        assert_same_state(rb.sampler.state_dict(), loaded.sampler.state_dict(), "sampler")
        writer = loaded.writer
        assert (writer.forgetting, writer.defer_keys, writer.evict_fraction) == (
            self.options["forgetting"],
            self.options["defer_keys"],
            self.options["evict_fraction"],
        )
        n_valid = len(self.model.row_uid)
        sampler = rb.sampler
        if n_valid and not (round(6 * sampler.mixture_ratio) and sampler.top_k > n_valid):
            draws = []  # the loaded memory samples exactly as the saved one would have
            for buffer in (rb, loaded):
                torch.manual_seed(_DRAW_SEED)
                batch = buffer.sample(6)
                draws.append((batch["index"].tolist(), batch["priority_weight"]))
            assert draws[0][0] == draws[1][0]
            torch.testing.assert_close(draws[0][1], draws[1][1])
        self.rb, self.encoder = loaded, encoder
        self.consolidator = self._consolidator()
        shutil.rmtree(path.parent, ignore_errors=True)

    @rule()
    def reclaim_slots(self):
        """Bulk slot recycling changes no stored episode and leaves no dead slot."""
        storage = self.rb.storage
        before = storage.num_episodes
        storage.reclaim_slots()
        assert storage.num_episodes == before
        table = storage.episodes
        if table is not None:
            assert not ((table["id"] >= 0) & (table["rows"] == 0) & table["done"]).any()

    @rule()
    def empty(self):
        self.rb.empty()
        self.model.reset()
        assert len(self.rb) == 0

    # ------------------------------------------------------------------ invariants
    @invariant()
    def memory_matches_the_model(self):
        if self.rb is None:
            return
        rb, model = self.rb, self.model
        storage = rb.storage
        assert len(rb) == len(storage) == model.high
        assert rb.writer._write_count == model.write_count
        if not storage.initialized:
            assert not model.row_uid
            return
        assert storage.num_valid == len(model.row_uid)
        assert storage.num_free_rows == model.high - len(model.row_uid)
        rows, stored = _stored(rb)
        # Nothing is lost but what the forgetting policy let go.
        assert rows.tolist() == sorted(model.row_uid)
        table = storage.episodes
        # Dead slots (episode done, no row left) keep their id until reclaimed in bulk.
        dead = (table["id"] >= 0) & (table["rows"] == 0) & table["done"]
        live_slot = ((table["id"] >= 0) & ~dead).nonzero().squeeze(1)
        ids = table["id"][live_slot].tolist()
        assert len(ids) == len(set(ids)), "an episode id holds two table slots"
        by_episode = model.stored_by_episode()
        expected_ids = set(by_episode) | set(model.open.values())
        assert set(ids) == expected_ids, "the table holds episodes it should not (or misses some)"
        if stored is None:
            return
        uids = stored["uid"].tolist()
        assert uids == [model.row_uid[r] for r in rows.tolist()]
        episode = stored["hippo", "episode"].tolist()
        step = stored["hippo", "step"].tolist()
        prev = stored["hippo", "prev"].tolist()
        assert episode == [model.of_uid[u][0] for u in uids]
        assert step == [model.of_uid[u][1] for u in uids]
        assert prev == [model.episodes[e].rows[s - 1] if s else -1 for e, s in zip(episode, step)]
        returns = stored["hippo", "return"]
        expected_returns = torch.tensor([model.episodes[e].ret for e in episode])
        torch.testing.assert_close(returns, expected_returns.to(returns.dtype))
        slot_of = dict(zip(ids, live_slot.tolist()))
        for episode_id in expected_ids:
            ep = model.episodes[episode_id]
            slot = slot_of[episode_id]
            have = by_episode.get(episode_id, [])
            assert int(table["rows"][slot]) == len(have)
            assert int(table["length"][slot]) == len(ep.uids)
            assert bool(table["done"][slot]) == ep.done
            assert float(table["return"][slot]) == pytest.approx(ep.ret, abs=1e-4)
            # The stored steps are consecutive: the episode's last steps.
            steps = sorted(model.of_uid[u][1] for u in have)
            assert steps == list(range(len(ep.uids) - len(have), len(ep.uids)))
        assert (stored.get("uid") >= 0).all()
        self._check_keys(rows, stored)

    def _check_keys(self, rows, stored):
        version = stored["hippo", "key_version"]
        key = stored["hippo", "key"]
        pending = version < 0
        if not self.options["defer_keys"]:
            assert not bool(pending.any())
        assert bool((version <= int(self.encoder.version)).all())
        ready = ~pending
        assert bool(torch.isfinite(key[ready]).all())
        torch.testing.assert_close(key[ready].norm(dim=-1), torch.ones(int(ready.sum())))
        # Keys of the current encoder whose whole window is still stored are that window's key.
        windows = self.rb.storage.gather_windows(rows, WINDOW)
        complete = windows["hippo", "window_mask"].sum(1) == (stored["hippo", "step"] + 1).clamp(
            max=WINDOW
        )
        check = complete & (version == int(self.encoder.version))
        if bool(check.any()):
            with torch.no_grad():
                expected = self.encoder(windows[check], target=True)["hippo", "key"]
            torch.testing.assert_close(key[check], expected, rtol=1e-4, atol=1e-5)


MemoryMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("HIPPO_PROPERTY_EXAMPLES", 40)),
    stateful_step_count=int(os.environ.get("HIPPO_PROPERTY_STEPS", 20)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMemoryMachine = MemoryMachine.TestCase


def test_rows_waiting_for_their_key_read_a_zero_key():
    from conftest import make_buffer, make_episodes

    rb = make_buffer(6, defer_keys=True, mixture_ratio=0.0)
    rb.extend(make_episodes([6]))
    rb.storage.encode_pending()
    rb.extend(make_episodes([3], seed=1))  # rows 0..2 again, keys deferred
    pending = rb.storage.get(torch.arange(3))
    assert (pending["hippo", "key_version"] == -1).all()
    assert (pending["hippo", "key"] == 0).all()
