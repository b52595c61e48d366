"""Segmenters: boundaries on hand-built trajectories, across calls, through the writer."""

import copy
import math
import random

import pytest
import torch
from conftest import make_buffer, make_episodes
from tensordict import TensorDict

from torchrl_hippo.data.segmenters import (
    ChangePointSegmenter,
    FixedWindowSegmenter,
    GoalSegmenter,
    Segmenter,
)

I64 = torch.int64


def batch(n, **entries):
    return TensorDict(entries, batch_size=[n])


def t(values, dtype=I64):
    return torch.tensor(values, dtype=dtype)


def cuts_of(starts):
    return starts.nonzero().squeeze(-1).tolist()


# ---------------------------------------------------------------------- a writer in miniature
def stream_data(length, *, starts=(0,), jumps=(), goals=(), dim=2, seed=0, step_size=0.1):
    """One stream: a random walk with small moves and big jumps at ``jumps``."""
    g = torch.Generator().manual_seed(seed)
    moves = torch.randn(length, dim, generator=g) * step_size
    for j in jumps:
        moves[j] += 100.0
    start = torch.zeros(length, dtype=torch.bool)
    start[list(starts)] = True
    goal = torch.zeros(length, dtype=torch.bool)
    goal[list(goals)] = True
    return {"observation": moves.cumsum(0), "start": start, "goal": goal}


def simulate(segmenter, streams, chunks, ids=None, carried=None):
    """Feeds ``streams`` to ``segmenter`` as the writer does, in calls of ``chunks`` steps.

    ``streams`` are dicts of ``observation`` [T, D], ``start`` [T] (default episode starts)
    and ``goal`` [T]. ``chunks`` is a list of calls; each is an int (that many steps of every
    stream, like an ``[env, time]`` batch) or a list of one int per stream (0: absent). The
    step given to the segmenter counts from the last default start or cut, as the writer's
    does (``carried``: each stream's position before the first call, ``None`` for a fresh
    stream). Returns, per stream, the cut positions and every step's position in its episode
    after the cuts (what the writer stores as ``("hippo", "step")``).
    """
    ids = list(range(len(streams))) if ids is None else ids
    carried = [None] * len(streams) if carried is None else list(carried)
    done = [0] * len(streams)
    cuts = [[] for _ in streams]
    position = [torch.full((st["start"].shape[0],), -1, dtype=I64) for st in streams]
    for chunk in chunks:
        sizes = [chunk] * len(streams) if isinstance(chunk, int) else chunk
        parts, steps, stream, spans = [], [], [], []
        for s, size in enumerate(sizes):
            if not size:
                continue
            lo = done[s]
            prev = carried[s]
            for j in range(size):
                prev = 0 if (streams[s]["start"][lo + j] or prev is None) else prev + 1
                steps.append(prev)
            parts.append({k: v[lo : lo + size] for k, v in streams[s].items()})
            stream += [ids[s]] * size
            spans.append((s, lo, size))
        data = TensorDict(
            {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, batch_size=[len(steps)]
        )
        starts = segmenter(data, t(steps), t(stream))
        assert starts.dtype == torch.bool and starts.shape == (len(steps),)
        row = 0
        for s, lo, size in spans:
            prev = carried[s]
            for j in range(size):
                cut = bool(starts[row + j])
                if cut:
                    cuts[s].append(lo + j)
                    assert steps[row + j] > 0, "a segmenter start where step == 0"
                prev = 0 if (cut or streams[s]["start"][lo + j] or prev is None) else prev + 1
                position[s][lo + j] = prev
            carried[s] = prev
            done[s] += size
            row += size
    assert all(bool((p >= 0).all()) for p in position), "chunks do not cover the streams"
    return cuts, position


def random_chunks(length, seed, max_chunk=9):
    rng = random.Random(seed)
    chunks, left = [], length
    while left:
        size = min(left, rng.randint(1, max_chunk))
        chunks.append(size)
        left -= size
    return chunks


# ---------------------------------------------------------------------- the contract
class TestContract:
    class EveryThird(Segmenter):
        def segment(self, data, step, stream):
            return step % 3 == 0

    @pytest.mark.parametrize(
        "args, error, match",
        [
            (("x", t([0]), t([0])), TypeError, "data must be a TensorDict"),
            ((TensorDict({}, [2, 2]), t([0, 1]), t([0, 0])), ValueError, "data must be flat"),
            ((batch(3), t([0.0, 1.0, 2.0], torch.float32), t([0, 0, 0])), TypeError, "step must"),
            ((batch(3), t([0, 1, 2]), [0, 0, 0]), TypeError, "stream must be an int64"),
            ((batch(3), t([0, 1]), t([0, 0, 0])), ValueError, r"step must hold .* \[3\]"),
            ((batch(3), t([0, 1, 2]), t([[0, 0, 0]])), ValueError, "stream must hold"),
            ((batch(3), t([0, -1, 0]), t([0, 0, 0])), ValueError, "step must be >= 0"),
            ((batch(4), t([0, 0, 1, 1]), t([0, 1, 0, 1])), ValueError, "contiguous"),
            ((batch(4), t([0, 1, 3, 4]), t([0, 0, 0, 0])), ValueError, "row 2 has step 3"),
        ],
    )
    def test_bad_inputs(self, args, error, match):
        with pytest.raises(error, match=match):
            self.EveryThird()(*args)

    def test_only_starts_past_the_default_ones(self):
        starts = self.EveryThird()(batch(7), t([0, 1, 2, 3, 0, 1, 2]), t([0] * 7))
        assert cuts_of(starts) == [3]
        assert self.EveryThird()(batch(0), t([]), t([])).shape == (0,)

    @pytest.mark.parametrize(
        "output, error, match",
        [
            (lambda n: (torch.arange(n) % 2).numpy(), TypeError, "bool tensor"),
            (lambda n: torch.zeros(n), TypeError, "bool tensor"),
            (lambda n: torch.zeros(n + 1, dtype=torch.bool), ValueError, "one flag per"),
            (lambda n: torch.zeros(n, 1, dtype=torch.bool), ValueError, "one flag per"),
        ],
    )
    def test_bad_segment_output(self, output, error, match):
        class Bad(Segmenter):
            def segment(self, data, step, stream):
                return output(step.shape[0])

        with pytest.raises(error, match=match):
            Bad()(batch(4), torch.arange(4), t([0] * 4))

    def test_stateless_state_dict(self):
        seg = FixedWindowSegmenter(3)
        assert seg.state_dict() == {}
        seg.load_state_dict({})
        with pytest.raises(ValueError, match="keeps no state"):
            seg.load_state_dict({"count": 1})

    def test_abstract(self):
        with pytest.raises(TypeError):
            Segmenter()


# ---------------------------------------------------------------------- fixed windows
class TestFixedWindow:
    def test_hand_built_streams(self):
        # Stream 5 continues an episode at step 2, stream 9 starts one and ends it, then
        # starts another; stream 1 continues at step 7 (past a cut of an earlier call: 7 % 4).
        step = t([2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1, 7, 8, 9])
        stream = t([5] * 5 + [9] * 7 + [1] * 3)
        starts = FixedWindowSegmenter(4)(batch(15), step, stream)
        assert cuts_of(starts) == [2, 9, 13]

    @pytest.mark.parametrize("length", [1, 3, 5, 50])
    @pytest.mark.parametrize("chunks", [[30], [1] * 30, [7, 7, 7, 9], "random"])
    def test_consistent_across_calls(self, length, chunks):
        streams = [
            stream_data(30, starts=(0, 11, 12), seed=1),
            stream_data(30, starts=(0,), seed=2),
            stream_data(30, starts=(0, 4, 25), seed=3),
        ]
        if chunks == "random":
            chunks = random_chunks(30, seed=length)
        cuts, position = simulate(FixedWindowSegmenter(length), streams, chunks)
        for s, st in enumerate(streams):
            # Expected: every ``length`` steps from each default start.
            since = 0
            want = []
            for i in range(30):
                since = 0 if st["start"][i] else since + 1
                if since and since % length == 0:
                    want.append(i)
            assert cuts[s] == want
            assert int(position[s].max()) < length

    @pytest.mark.parametrize("length", [0, -2, 2.5, True, None])
    def test_bad_length(self, length):
        with pytest.raises(ValueError, match="length must be an int >= 1"):
            FixedWindowSegmenter(length)


# ---------------------------------------------------------------------- goals
def goal_of(data):
    return data["goal"]


class TestGoal:
    def test_goal_ends_the_episode(self):
        seg = GoalSegmenter(goal_of)
        # Stream 3: goal at row 1 (mid-stream) and at its last row 3; stream 8 follows, its
        # first row is no start (another stream); its goal at row 6 is its last row.
        goal = t([0, 1, 0, 1, 0, 0, 1], torch.bool)
        step = t([4, 5, 6, 7, 0, 1, 2])
        stream = t([3, 3, 3, 3, 8, 8, 8])
        assert cuts_of(seg(batch(7, goal=goal), step, stream)) == [2]
        assert seg.state_dict()["pending_streams"].tolist() == [3, 8]
        # Next call: both streams start a new episode at their first row.
        starts = seg(
            batch(4, goal=torch.zeros(4, dtype=torch.bool)), t([1, 2, 1, 2]), t([8, 8, 3, 3])
        )
        assert cuts_of(starts) == [0, 2]
        assert seg.state_dict()["pending_streams"].tolist() == []

    def test_pending_goal_waits_for_its_stream(self):
        seg = GoalSegmenter(goal_of)
        seg(batch(2, goal=t([0, 1], torch.bool)), t([3, 4]), t([0, 0]))
        # Stream 0 is absent from this call: its goal stays pending.
        seg(batch(2, goal=t([0, 0], torch.bool)), t([0, 1]), t([1, 1]))
        assert seg.state_dict()["pending_streams"].tolist() == [0]
        assert cuts_of(seg(batch(2, goal=t([0, 0], torch.bool)), t([5, 6]), t([0, 0]))) == [0]

    def test_goal_on_a_default_end_adds_nothing(self):
        seg = GoalSegmenter(goal_of)
        seg(batch(2, goal=t([0, 1], torch.bool)), t([3, 4]), t([0, 0]))
        # The stream's next row starts an episode anyway (step 0): nothing more to cut.
        assert cuts_of(seg(batch(3, goal=t([0, 0, 0], torch.bool)), t([0, 1, 2]), t([0] * 3))) == []

    @pytest.mark.parametrize(
        "chunks", [[24], [1] * 24, [5, 6, 13], [[9, 0, 4], [0, 12, 10], [15, 12, 10]]]
    )
    def test_consistent_across_calls(self, chunks):
        goals = [(3, 8, 9, 23), (0, 11, 21), (5, 6, 7)]
        streams = [
            stream_data(24, starts=(0, 10), goals=goals[0], seed=1),
            stream_data(24, starts=(0,), goals=goals[1], seed=2),
            stream_data(24, starts=(0, 6, 20), goals=goals[2], seed=3),
        ]
        cuts, _ = simulate(GoalSegmenter(goal_of), streams, chunks, ids=[10, 4, 7])
        for s, st in enumerate(streams):
            want = [g + 1 for g in goals[s] if g + 1 < 24 and not st["start"][g + 1]]
            assert cuts[s] == want

    def test_predicate_shape_n_by_one(self):
        seg = GoalSegmenter(lambda td: td["next", "reward"] > 0.5)
        data = batch(4, next=batch(4, reward=t([[0.0], [1.0], [0.0], [0.0]], torch.float32)))
        assert cuts_of(seg(data, t([1, 2, 3, 4]), t([0] * 4))) == [2]

    @pytest.mark.parametrize(
        "predicate, error, match",
        [
            (lambda td: td["goal"].float(), TypeError, "bool tensor, got torch.float32"),
            (lambda td: td["goal"].tolist(), TypeError, "bool tensor, got list"),
            (lambda td: td["goal"][:-1], ValueError, r"shape \[4\] or \[4, 1\]"),
            (lambda td: td["goal"].reshape(2, 2), ValueError, "one flag per transition"),
        ],
    )
    def test_bad_predicate_output(self, predicate, error, match):
        seg = GoalSegmenter(predicate)
        with pytest.raises(error, match=match):
            seg(batch(4, goal=t([0, 1, 0, 1], torch.bool)), t([1, 2, 3, 4]), t([0] * 4))
        assert seg.state_dict()["pending_streams"].numel() == 0  # nothing committed

    def test_bad_args(self):
        with pytest.raises(TypeError, match="predicate must be callable"):
            GoalSegmenter("goal")
        with pytest.raises(ValueError, match="max_streams"):
            GoalSegmenter(goal_of, max_streams=0)

    def test_state_dict_round_trip_and_bound(self, tmp_path):
        seg = GoalSegmenter(goal_of, max_streams=2)
        goal = torch.ones(3, dtype=torch.bool)
        seg(batch(3, goal=goal), t([1, 1, 1]), t([4, 5, 6]))  # three pending, two remembered
        state = seg.state_dict()
        assert state["pending_streams"].tolist() == [5, 6]
        torch.save(state, tmp_path / "s.pt")
        fresh = GoalSegmenter(goal_of, max_streams=2)
        fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        probe = (batch(3, goal=torch.zeros(3, dtype=torch.bool)), t([2, 2, 2]), t([4, 5, 6]))
        assert cuts_of(fresh(*probe)) == cuts_of(seg(*probe)) == [1, 2]
        fresh.reset()
        assert fresh.state_dict()["pending_streams"].numel() == 0
        with pytest.raises(ValueError, match="expects the entries"):
            fresh.load_state_dict({"pending": t([1])})
        with pytest.raises(ValueError, match="1-D int64"):
            fresh.load_state_dict({"pending_streams": t([1.0], torch.float32)})


# ---------------------------------------------------------------------- change points
class ReferenceChangePoint(Segmenter):
    """The change-point rule, row by row (the specification the vectorised one must meet)."""

    def __init__(self, *, k, min_length, max_length, warmup):
        self.k, self.min_length, self.max_length, self.warmup = k, min_length, max_length, warmup
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.last = {}

    def segment(self, data, step, stream):
        obs = data["observation"].double()
        n = step.shape[0]
        out = torch.zeros(n, dtype=torch.bool)
        pos = 0
        for i in range(n):
            s, st = int(stream[i]), int(step[i])
            first = i == 0 or int(stream[i - 1]) != s
            prev = self.last.get(s) if first else obs[i - 1]
            d = math.nan if prev is None else float((obs[i] - prev).norm())
            valid = math.isfinite(d) and st > 0
            std = math.sqrt(self.m2 / self.count) if self.count else 0.0
            jump = (
                valid
                and self.count >= self.warmup
                and not math.isinf(self.k)
                and d > self.mean + self.k * std
            )
            pos = 0 if st == 0 else (st if first else pos + 1)
            cut = st > 0 and (
                (jump and pos >= self.min_length)
                or (self.max_length is not None and pos >= self.max_length)
            )
            if cut:
                pos = 0
            out[i] = cut
            if valid:  # Welford
                self.count += 1
                delta = d - self.mean
                self.mean += delta / self.count
                self.m2 += delta * (d - self.mean)
            self.last[s] = obs[i]
        return out


def jumpy_streams(length=60, seed=0):
    rng = random.Random(seed)
    streams = []
    for s in range(3):
        jumps = sorted(rng.sample(range(1, length), 6))
        starts = [0, *sorted(rng.sample(range(1, length), 2))]
        streams.append(stream_data(length, starts=starts, jumps=jumps, seed=seed * 10 + s))
    return streams


class TestChangePoint:
    @pytest.mark.parametrize(
        "k, min_length, max_length, warmup",
        [
            (3.0, 1, None, 5),
            (3.0, 4, None, 5),
            (2.0, 3, 7, 10),
            (3.0, 1, 5, 1),
            (0.5, 2, 9, 20),
            (float("inf"), 1, 6, 5),
            (3.0, 5, 5, 5),
        ],
    )
    @pytest.mark.parametrize("chunks", [[60], [1] * 60, [13, 20, 27], "random", "uneven"])
    @pytest.mark.parametrize("seed", [0, 1])
    def test_matches_row_by_row_reference(self, k, min_length, max_length, warmup, chunks, seed):
        streams = jumpy_streams(seed=seed)
        if chunks == "random":
            chunks = random_chunks(60, seed=seed)
        elif chunks == "uneven":  # streams absent from some calls, of unequal lengths
            chunks = [[10, 0, 25], [20, 30, 0], [0, 30, 35], [30, 0, 0]]
        kwargs = dict(k=k, min_length=min_length, max_length=max_length, warmup=warmup)
        ids = [12, 3, 40]
        got, got_pos = simulate(ChangePointSegmenter(**kwargs), streams, chunks, ids=ids)
        want, want_pos = simulate(ReferenceChangePoint(**kwargs), streams, chunks, ids=ids)
        assert got == want
        for a, b in zip(got_pos, want_pos):
            assert a.tolist() == b.tolist()
            if max_length is not None:
                assert int(a.max()) < max_length

    @pytest.mark.parametrize("chunks", [[1] * 60, [7, 30, 23], "random"])
    def test_one_stream_cut_the_same_in_one_call_or_many(self, chunks):
        streams = jumpy_streams(seed=3)[:1]
        if chunks == "random":
            chunks = random_chunks(60, seed=5, max_chunk=4)
        kwargs = dict(k=3.0, min_length=2, max_length=11, warmup=8)
        whole, _ = simulate(ChangePointSegmenter(**kwargs), streams, [60])
        split, _ = simulate(ChangePointSegmenter(**kwargs), streams, chunks)
        assert whole == split
        assert len(whole[0]) >= 5

    def test_hand_built_min_max_and_warmup(self):
        # Unit moves along a line, jumps at rows 2 (during the warm-up: ignored), 20, 22 and 45.
        moves = torch.ones(60)
        moves[2] = 30.0
        moves[[20, 22, 45]] = 1000.0
        data = batch(60, observation=moves.cumsum(0).unsqueeze(-1))
        step, stream = torch.arange(60), t([0] * 60)
        seg = ChangePointSegmenter(k=3.0, warmup=4)
        assert cuts_of(seg(data, step, stream)) == [20, 22, 45]
        assert seg.count == 59
        # max_length 15 cuts at 15 (before the jump at 20) and at 35; min_length 3 forbids
        # the cut at 22, two steps after the one at 20.
        seg = ChangePointSegmenter(k=3.0, warmup=4, min_length=3, max_length=15)
        assert cuts_of(seg(data, step, stream)) == [15, 20, 35, 45]
        # Without the warm-up the jump at row 2 counts.
        seg = ChangePointSegmenter(k=3.0, warmup=1)
        assert cuts_of(seg(data, step, stream))[:1] == [2]

    def test_jump_at_the_first_row_of_a_call(self):
        seg = ChangePointSegmenter(k=3.0, warmup=3, min_length=2)
        line = torch.arange(6.0).unsqueeze(-1)
        seg(batch(6, observation=line), torch.arange(6), t([0] * 6))
        far = line + 100.0
        # The first row jumps from the stream's last observation (5 -> 100).
        starts = seg(batch(6, observation=far), torch.arange(6, 12), t([0] * 6))
        assert cuts_of(starts) == [0]
        # An unknown stream has no previous observation: nothing to compare with.
        seg.reset()
        assert cuts_of(seg(batch(6, observation=far), torch.arange(6, 12), t([0] * 6))) == []
        assert seg.count == 5

    def test_continued_segment_counts_from_its_anchor(self):
        # step 5 at the first row: the segment began 5 rows before this call.
        seg = ChangePointSegmenter(k=float("inf"), max_length=7)
        starts = seg(batch(10, observation=torch.zeros(10, 1)), torch.arange(5, 15), t([0] * 10))
        assert cuts_of(starts) == [2, 9]
        # A step already past max_length (e.g. max_length lowered): cut at once.
        seg = ChangePointSegmenter(k=float("inf"), max_length=3)
        starts = seg(batch(4, observation=torch.zeros(4, 1)), torch.arange(5, 9), t([0] * 4))
        assert cuts_of(starts) == [0, 3]

    def test_resets_are_not_distances(self):
        seg = ChangePointSegmenter(warmup=1)
        obs = torch.tensor([[0.0], [1.0], [500.0], [501.0]])
        starts = seg(batch(4, observation=obs), t([0, 1, 0, 1]), t([0] * 4))
        assert cuts_of(starts) == []
        assert (seg.count, seg.mean, seg.std) == (2, 1.0, 0.0)

    @pytest.mark.parametrize("length", [1, 4, 9])
    def test_infinite_k_is_a_fixed_window(self, length):
        streams = jumpy_streams(seed=2)
        chunks = random_chunks(60, seed=length)
        a, _ = simulate(ChangePointSegmenter(k=float("inf"), max_length=length), streams, chunks)
        b, _ = simulate(FixedWindowSegmenter(length), streams, chunks)
        assert a == b

    def test_integer_and_image_observations(self):
        frames = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
        frames[5:] = 255  # the scene changes at row 5 (uint8 must not wrap around)
        frames[torch.arange(8), 0, 0, 0] = torch.arange(8, dtype=torch.uint8)
        seg = ChangePointSegmenter(("next", "pixels"), warmup=2)
        data = batch(8, next=batch(8, pixels=frames))
        assert cuts_of(seg(data, torch.arange(8), t([0] * 8))) == [5]

    def test_state_dict_round_trip(self, tmp_path):
        streams = jumpy_streams(seed=4)
        kwargs = dict(k=2.5, min_length=2, max_length=9, warmup=6, max_streams=8)
        seg = ChangePointSegmenter(**kwargs)
        _, position = simulate(seg, [{k: v[:20] for k, v in st.items()} for st in streams], [20])
        carried = [int(p[-1]) for p in position]
        torch.save(seg.state_dict(), tmp_path / "s.pt")
        fresh = ChangePointSegmenter(**kwargs)
        fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        assert (fresh.count, fresh.mean, fresh.m2) == (seg.count, seg.mean, seg.m2)
        rest = [{k: v[20:] for k, v in st.items()} for st in streams]
        # The episodes continue: cut alike by both, first rows compared with the stored ones.
        cuts, _ = simulate(copy.deepcopy(seg), rest, [40], carried=carried)
        assert cuts == simulate(fresh, rest, [40], carried=carried)[0]
        ref = ReferenceChangePoint(k=2.5, min_length=2, max_length=9, warmup=6)
        whole, _ = simulate(ref, streams, [20, 40])
        assert cuts == [[c - 20 for c in w if c >= 20] for w in whole]
        assert sum(map(len, cuts)) >= 3
        fresh.reset()
        assert fresh.count == 0 and fresh.state_dict()["streams"].numel() == 0

    def test_streams_remembered_are_bounded(self):
        seg = ChangePointSegmenter(max_streams=2)
        seg(batch(4, observation=torch.zeros(4, 1)), t([1, 1, 1, 1]), t([0, 1, 2, 3]))
        assert seg.state_dict()["streams"].tolist() == [2, 3]
        assert seg.state_dict()["last_observation"].shape == (2, 1)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(k=-1.0), "k must be a number >= 0"),
            (dict(k=math.nan), "k must be a number >= 0"),
            (dict(k="3"), "k must be a number >= 0"),
            (dict(min_length=0), "min_length must be an int >= 1"),
            (dict(max_length=0), "max_length must be an int >= 1"),
            (dict(min_length=5, max_length=4), "max_length must be >= min_length"),
            (dict(warmup=0), "warmup must be an int >= 1"),
            (dict(p=0), "p must be a norm order > 0"),
            (dict(max_streams=1.5), "max_streams must be an int >= 1"),
        ],
    )
    def test_bad_args(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ChangePointSegmenter(**kwargs)
        with pytest.raises(TypeError, match="NestedKey"):
            ChangePointSegmenter(3)

    def test_bad_batches(self):
        seg = ChangePointSegmenter()
        with pytest.raises(KeyError, match="reads the observation 'observation'"):
            seg(batch(2, obs=torch.zeros(2, 1)), t([0, 1]), t([0, 0]))
        seg(batch(2, observation=torch.zeros(2, 3)), t([0, 1]), t([0, 0]))
        with pytest.raises(ValueError, match=r"has 4 features per transition, but .* had 3"):
            seg(batch(2, observation=torch.zeros(2, 4)), t([2, 3]), t([0, 0]))
        assert seg.count == 1  # the bad batch changed nothing
        with pytest.raises(ValueError, match="expects the entries"):
            seg.load_state_dict({"count": 0})
        bad = seg.state_dict()
        bad["last_observation"] = torch.zeros(3)
        with pytest.raises(ValueError, match="last_observation"):
            seg.load_state_dict(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedWindowSegmenter(4),
        lambda: GoalSegmenter(goal_of),
        lambda: ChangePointSegmenter(k=2.0, min_length=2, max_length=9, warmup=5),
    ],
)
def test_same_starts_on_cuda(make):
    streams = jumpy_streams(seed=5)
    for st in streams:
        st["goal"][::7] = True
    cpu, cuda = make(), make()
    carried = [0, 0, 0]
    for lo, hi in [(0, 25), (25, 26), (26, 60)]:
        data = TensorDict(
            {k: torch.cat([st[k][lo:hi] for st in streams]) for k in streams[0]}, [3 * (hi - lo)]
        )
        step = torch.cat([torch.arange(c + 1, c + 1 + hi - lo) for c in carried])
        stream = torch.arange(3).repeat_interleave(hi - lo)
        want = cpu(data, step, stream)
        got = cuda(data.to("cuda"), step.cuda(), stream.cuda())
        assert got.device.type == "cuda"
        assert got.cpu().tolist() == want.tolist()
        carried = [int(s[-1]) for s in step.reshape(3, -1)]  # steps as given (no cuts)


# ---------------------------------------------------------------------- through the writer
def with_observations(data, obs):
    data = data.clone()
    data["observation"] = obs
    return data


class TestThroughTheWriter:
    @staticmethod
    def stored(rb, index):
        rows = rb.storage.get(index.reshape(-1))
        return rows["hippo", "episode"], rows["hippo", "step"]

    @staticmethod
    def extend_in_chunks(rb, data, chunks):
        index, start = [], 0
        for size in chunks:
            index.append(rb.extend(data[:, start : start + size]))
            start += size
        return torch.cat(index, 1)

    @pytest.mark.parametrize("kind", ["goal", "window"])
    @pytest.mark.parametrize("chunks", [[40], [7, 13, 20], [1] * 40])
    def test_goal_and_fixed_window_on_env_time_batches(self, kind, chunks):
        # Two envs, episodes [17, 23] and [40]; a goal where the reward is 1.
        envs = [
            make_episodes([17, 23], reward=0.0, seed=1),
            make_episodes([40], reward=0.0, seed=2),
        ]
        for env, goals in zip(envs, [(6, 16, 30), (12, 13, 39)]):
            env["next", "reward"][list(goals)] = 1.0
        data = torch.stack(envs, 0)  # [env=2, time=40]

        def make():
            if kind == "goal":
                return GoalSegmenter(lambda td: td["next", "reward"] > 0)
            return FixedWindowSegmenter(6)

        rb = make_buffer(200)
        rb.writer.segmenter = make()
        index = self.extend_in_chunks(rb, data, chunks)
        streams = [
            {
                "next": env["next"],
                "observation": env["observation"],
                "start": env["is_init"].squeeze(-1),
            }
            for env in envs
        ]
        _, position = simulate(make(), streams, chunks)
        for e in range(2):
            episode, step = self.stored(rb, index[e])
            assert step.tolist() == position[e].tolist()
            new = torch.cat([torch.ones(1, dtype=torch.bool), episode[1:] != episode[:-1]])
            assert new.tolist() == (step == 0).tolist()  # a new episode where steps restart
        table = rb.storage.episodes
        lengths = table["length"][table["rows"] > 0]
        assert int(lengths.sum()) == 80
        if kind == "window":
            assert int(lengths.max()) == 6
        else:  # the goals at 6 and 30 (env 0), 12 and 13 (env 1) add four episodes
            assert sorted(lengths.tolist()) == sorted([7, 10, 14, 9, 13, 1, 26])

    @pytest.mark.parametrize("chunks", [[50], [9, 21, 20], "random"])
    def test_change_points_on_interleaved_traj_id_batches(self, chunks):
        # Env 0 runs trajectories 0 (30 steps) then 2 (20 steps); env 1 runs trajectory 1.
        envs = []
        for e, (lengths, jumps) in enumerate([([30, 20], (5, 18, 22, 40)), ([50], (10, 11, 33))]):
            walk = stream_data(50, jumps=jumps, dim=3, seed=e)["observation"]
            envs.append(with_observations(make_episodes(lengths, seed=e), walk))
        data = torch.stack(envs, 0)
        data["collector", "traj_ids"] = torch.tensor([[0] * 30 + [2] * 20, [1] * 50])
        if chunks == "random":
            chunks = random_chunks(50, seed=11, max_chunk=12)
        kwargs = dict(k=3.0, min_length=3, max_length=15, warmup=10)
        rb = make_buffer(200)
        rb.writer.segmenter = ChangePointSegmenter(**kwargs)
        index, start = [], 0
        for size in chunks:
            part = data[:, start : start + size].transpose(0, 1).reshape(-1)  # time-major
            index.append(rb.extend(part).reshape(size, 2).T)
            start += size
        index = torch.cat(index, 1)
        # The row-by-row rule on what the writer sees: the trajectories in id order.
        trajs = [
            {"observation": envs[0]["observation"][:30], "start": envs[0]["is_init"][:30, 0]},
            {"observation": envs[1]["observation"], "start": envs[1]["is_init"][:, 0]},
            {"observation": envs[0]["observation"][30:], "start": envs[0]["is_init"][30:, 0]},
        ]
        calls, start = [], 0
        for size in chunks:
            first = min(max(30 - start, 0), size)  # rows of trajectory 0 in this call
            calls.append([first, size, size - first])
            start += size
        cuts, position = simulate(ReferenceChangePoint(**kwargs), trajs, calls)
        want = [torch.cat([position[0], position[2]]), position[1]]
        for e in range(2):
            _, step = self.stored(rb, index[e])
            assert step.tolist() == want[e].tolist()
        assert rb.storage.num_episodes == 3 + sum(map(len, cuts))
        assert sum(map(len, cuts)) >= 7
        assert int(rb.storage.episodes["length"].max()) <= 15

    def test_writer_state_dict_carries_the_segmenter(self, tmp_path):
        moves = torch.randn(40, 3) * 0.1
        moves[[12, 25]] += 50.0
        data = with_observations(make_episodes([40], seed=4), moves.cumsum(0))
        kwargs = dict(k=3.0, warmup=5, max_length=20)
        rb = make_buffer(100)
        rb.writer.segmenter = ChangePointSegmenter(**kwargs)
        rb.extend(data[:20])
        rb.dumps(tmp_path / "rb")
        restored = make_buffer(100)
        restored.writer.segmenter = ChangePointSegmenter(**kwargs)
        restored.loads(tmp_path / "rb")
        assert restored.writer.segmenter.count == rb.writer.segmenter.count == 19
        a, b = rb.extend(data[20:]), restored.extend(data[20:])
        for name in ("episode", "step"):
            assert torch.equal(
                rb.storage.get(a)["hippo", name], restored.storage.get(b)["hippo", name]
            )
        steps = rb.storage.get(torch.arange(40))["hippo", "step"]
        assert cuts_of(steps == 0) == [0, 12, 25]
