"""Long sequential games where what happened early decides what pays late.

Two games share one environment class (``game=``):

- ``"matching"``: a memory-matching (concentration) game. Cards are turned one at a time; a pair
  of equal cards turned in a row is removed and pays. Only the card just turned is observed, so
  scoring well means remembering where every value was seen.
- ``"auction"``: a first-price auction of one item per round against a scripted opponent, with
  one budget for the whole game. Items in the last rounds are worth several times more, so
  money spent early is missing late, and the opponent's remaining budget (hidden) can only be
  tracked by remembering its past bids.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from torchrl_hippo.envs._utils import (
    check_action,
    check_choice,
    check_float,
    check_int,
    check_render_mode,
)

__all__ = ["GAMES", "SequenceGames"]

GAMES = ("matching", "auction")
OPPONENTS = ("pacing", "greedy")

StepResult = tuple[np.ndarray, float, bool, bool, dict[str, Any]]


class _Matching:
    """Concentration with ``pairs`` pairs of cards, dealt again each time the board is cleared."""

    def __init__(self, pairs: int, steps: int) -> None:
        self.pairs, self.steps = pairs, steps
        self.cards = 2 * pairs
        self.flags = 3 * pairs  # index of the first flag
        self.dim = 3 * pairs + 8
        self.n_actions = self.cards
        self.buf = np.zeros(self.dim, dtype=np.float32)
        self.board: list[int] = []
        self.removed: list[bool] = []
        self.first = -1
        self.last = -1
        self.remaining = pairs
        self.t = 0
        self.matches = 0
        self.boards = 0
        self.rng: np.random.Generator | None = None

    def deal(self) -> None:
        assert self.rng is not None
        self.board = self.rng.permutation(np.repeat(np.arange(self.pairs), 2)).tolist()
        self.removed = [False] * self.cards
        self.remaining = self.pairs

    def reset(self, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        self.rng = rng
        self.deal()
        self.first = self.last = -1
        self.t = self.matches = self.boards = 0
        self.buf.fill(0.0)
        return self.buf.copy(), {"matches": 0, "boards": 0}

    def step(self, a: int) -> StepResult:
        buf, f = self.buf, self.flags
        buf.fill(0.0)
        self.t += 1
        reward = 0.0
        if self.removed[a] or a == self.first:
            buf[f + 4] = 1.0  # invalid: the card is gone or already face up
            self.last = -1
        else:
            value = self.board[a]
            buf[a] = 1.0
            buf[self.cards + value] = 1.0
            self.last = a
            if self.first < 0:
                self.first = a
                buf[f] = 1.0
            else:
                buf[f + 1] = 1.0
                if self.board[self.first] == value:
                    self.removed[a] = self.removed[self.first] = True
                    self.remaining -= 1
                    self.matches += 1
                    reward = 1.0
                    buf[f + 2] = 1.0
                    if self.remaining == 0:
                        self.deal()
                        self.boards += 1
                        buf[f + 5] = 1.0
                else:
                    buf[f + 3] = 1.0
                self.first = -1
        buf[f + 6] = self.t / self.steps
        buf[f + 7] = 1.0 - self.remaining / self.pairs
        terminated = self.t >= self.steps
        return (
            buf.copy(),
            reward,
            terminated,
            False,
            {"matches": self.matches, "boards": self.boards},
        )

    def render(self) -> str:
        cells = []
        for i, (value, gone) in enumerate(zip(self.board, self.removed)):
            if gone:
                cells.append(".")
            elif i in (self.first, self.last):
                cells.append(str(value % 10))
            else:
                cells.append("#")
        return f"{''.join(cells)} t={self.t} matches={self.matches} boards={self.boards}"


class _Auction:
    """One first-price sealed-bid auction per round against a scripted, budget-pacing opponent."""

    def __init__(
        self,
        steps: int,
        max_bid: int,
        budget: int,
        late_fraction: float,
        late_bonus: float,
        opponent: str,
    ) -> None:
        self.steps, self.max_bid, self.budget0 = steps, max_bid, budget
        self.late_start = steps - round(late_fraction * steps)
        self.late_bonus = late_bonus
        self.greedy = opponent == "greedy"
        self.mean_value = (max_bid + 1) / 2
        self.dim = 9
        self.n_actions = max_bid + 1
        self.buf = np.zeros(self.dim, dtype=np.float32)
        self.inv_bid = 1.0 / max_bid
        self.values: list[int] = []
        self.jitter: list[float] = []
        self.t = 0
        self.budget = self.opp_budget = budget
        self.won = self.spent = 0

    def _show_item(self) -> None:
        buf, t = self.buf, self.t
        if t < self.steps:
            buf[0] = self.values[t] * self.inv_bid
            buf[1] = 1.0 if t >= self.late_start else 0.0
        else:
            buf[0] = buf[1] = 0.0
        buf[2] = self.budget / self.budget0
        buf[3] = t / self.steps

    def reset(self, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        self.values = rng.integers(1, self.max_bid + 1, size=self.steps).tolist()
        self.jitter = rng.random(self.steps).tolist()
        self.t = 0
        self.budget = self.opp_budget = self.budget0
        self.won = self.spent = 0
        self.buf.fill(0.0)
        self._show_item()
        return self.buf.copy(), {"won": 0, "budget": self.budget}

    def _opponent_bid(self, value: int) -> int:
        if self.greedy:
            bid = value
        else:  # spread the remaining budget over the remaining rounds, bid in proportion to value
            pace = self.opp_budget / ((self.steps - self.t) * self.mean_value)
            bid = int(value * min(pace, 1.5) + self.jitter[self.t])
        return min(bid, self.opp_budget, self.max_bid)

    def step(self, a: int) -> StepResult:
        buf, t = self.buf, self.t
        value = self.values[t]
        bid = min(a, self.budget)
        other = self._opponent_bid(value)
        reward = 0.0
        buf[4] = buf[5] = buf[6] = 0.0
        if bid > other:
            self.budget -= bid
            self.won += 1
            self.spent += bid
            reward = value * self.inv_bid
            if t >= self.late_start:
                reward *= 1.0 + self.late_bonus
            buf[4] = 1.0
        elif other > 0:
            self.opp_budget -= other
            buf[5] = 1.0
        else:
            buf[6] = 1.0  # nobody bid: the item is not sold
        buf[7] = bid * self.inv_bid
        buf[8] = other * self.inv_bid
        self.t = t + 1
        self._show_item()
        terminated = self.t >= self.steps
        return buf.copy(), reward, terminated, False, {"won": self.won, "budget": self.budget}

    def render(self) -> str:
        value = self.values[self.t] if self.t < self.steps else 0
        phase = "late" if self.t >= self.late_start else "early"
        return (
            f"round {self.t}/{self.steps} ({phase}) item={value} budget={self.budget}/"
            f"{self.budget0} won={self.won} spent={self.spent}"
        )


class SequenceGames(gym.Env[np.ndarray, np.int64]):
    """Long sequential games in which early choices constrain late payoffs (``game=``).

    Both games last exactly ``steps`` steps; the last step is ``terminated`` (the horizon is part
    of the game and observed as the progress feature).

    **``game="matching"``**: a memory-matching game with ``2 * pairs`` face-down cards holding
    ``pairs`` values twice each. Each step turns one card (``Discrete(2 * pairs)``). Two turned
    in a row that match are removed and pay ``1.0``; otherwise they turn back. Turning a removed
    card, or the card already face up, is an invalid (wasted) step. A cleared board is dealt
    again, shuffled. Observation (``Box(float32)``, shape ``[3 * pairs + 8]``): position of the
    card just turned (one-hot, ``2 * pairs``), its value (one-hot, ``pairs``), then the flags
    first turn, second turn, match, mismatch, invalid, new board, and the progress
    ``t / steps`` and the fraction of the board cleared. ``info``: ``"matches"``, ``"boards"``.

    **``game="auction"``**: each step auctions one item of value ``1 .. max_bid`` (drawn at
    reset) to the agent and a scripted opponent, sealed bids, first price: the higher bid wins
    and pays its bid; ties go to the opponent; if both bid ``0`` the item is not sold. Each side
    has ``budget`` for the whole game and cannot bid more than it has left. Winning pays
    ``value / max_bid``, times ``1 + late_bonus`` in the last ``late_fraction`` of the rounds.
    The ``"pacing"`` opponent bids ``value * min(1.5, remaining budget / (rounds left * mean
    value))``, rounded with jitter; the ``"greedy"`` one bids the item's value. The opponent's
    budget is never observed. Actions: the bid, ``Discrete(max_bid + 1)``. Observation
    (``Box(float32)``, shape ``[9]``): item value ``/ max_bid``, late-phase flag, own budget
    fraction, progress ``t / steps``, last round won / lost / unsold, own last bid and the
    opponent's last bid ``/ max_bid``. ``info``: ``"won"``, ``"budget"``.

    Args:
        game (str, optional): ``"matching"`` or ``"auction"``. Defaults to ``"matching"``.

    Keyword Args:
        steps (int, optional): episode length (turns, or rounds). Defaults to ``2048``.
        pairs (int, optional): matching: pairs of cards, ``>= 2``. Defaults to ``16``.
        max_bid (int, optional): auction: highest item value and bid, ``>= 1``.
            Defaults to ``10``.
        budget (int, optional): auction: each side's budget. Defaults to ``None``:
            ``2 * steps``.
        late_fraction (float, optional): auction: share of rounds, at the end, whose items are
            worth more, in ``[0, 1]``. Defaults to ``0.125``.
        late_bonus (float, optional): auction: extra worth of late items, ``>= 0``.
            Defaults to ``4.0``.
        opponent (str, optional): auction: ``"pacing"`` or ``"greedy"``. Defaults to
            ``"pacing"``.
        render_mode (str, optional): ``None`` or ``"ansi"``. Defaults to ``None``.

    Examples:
        >>> from torchrl_hippo.envs import SequenceGames
        >>> env = SequenceGames("matching", pairs=2, steps=8, render_mode="ansi")
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape, env.action_space
        ((14,), Discrete(4))
        >>> obs, reward, terminated, truncated, info = env.step(0)
        >>> print(env.render())
        1### t=1 matches=0 boards=0
        >>> env = SequenceGames("auction", steps=4, max_bid=3, budget=6, late_fraction=0.25)
        >>> obs, info = env.reset(seed=0)
        >>> obs[:4]  # item value / max_bid, late flag, budget fraction, progress
        array([1., 0., 1., 0.], dtype=float32)
        >>> obs, reward, terminated, truncated, info = env.step(3)  # bid 3 on the item worth 3
        >>> reward, info
        (1.0, {'won': 1, 'budget': 3})
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        game: str = "matching",
        *,
        steps: int = 2048,
        pairs: int = 16,
        max_bid: int = 10,
        budget: int | None = None,
        late_fraction: float = 0.125,
        late_bonus: float = 4.0,
        opponent: str = "pacing",
        render_mode: str | None = None,
    ) -> None:
        self.game = check_choice("game", game, GAMES)
        self.steps = check_int("steps", steps, minimum=1)
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])
        self._game: _Matching | _Auction
        if self.game == "matching":
            self._game = _Matching(check_int("pairs", pairs, minimum=2), self.steps)
        else:
            self._game = _Auction(
                self.steps,
                check_int("max_bid", max_bid, minimum=1),
                2 * self.steps if budget is None else check_int("budget", budget, minimum=1),
                check_float("late_fraction", late_fraction, low=0.0, high=1.0),
                check_float("late_bonus", late_bonus, low=0.0),
                check_choice("opponent", opponent, OPPONENTS),
            )
        self.observation_space = spaces.Box(0.0, 1.0, (self._game.dim,), dtype=np.float32)
        self.action_space = spaces.Discrete(self._game.n_actions)
        self._n_actions = self._game.n_actions
        self._started = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Deals a new game. ``options`` is accepted for API compatibility and ignored."""
        super().reset(seed=seed)
        self._started = True
        return self._game.reset(self.np_random)

    def step(self, action: np.int64 | int) -> StepResult:
        """Plays one turn (matching) or one bid (auction)."""
        a = check_action(action, self._n_actions)
        if not self._started:
            raise RuntimeError("SequenceGames.step() called before reset().")
        return self._game.step(a)

    def render(self) -> str | None:
        """The game's state as one line of text (``render_mode="ansi"``)."""
        if self.render_mode != "ansi" or not self._started:
            return None
        return self._game.render()
