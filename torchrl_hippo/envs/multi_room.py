"""Navigation through a row of rooms joined by locked doors, with keys left in earlier rooms.

The agent sees only a small window around itself and can carry one key at a time. The key of
each door lies in some room before it, often far back, so the agent must remember where it saw
which key, and what it is carrying, across thousands of steps.
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

__all__ = ["MultiRoomKeys"]

EMPTY, WALL, DOOR, KEY, GOAL = 0, 1, 2, 3, 4
_CHANNELS = 5  # wall, locked door, key, goal, colour code
_DY = (-1, 0, 1, 0)
_DX = (0, 1, 0, -1)


class MultiRoomKeys(gym.Env[np.ndarray, np.int64]):
    """``rooms`` rooms in a row, joined by locked doors; the goal is in the last room.

    Each room is a ``room_size x room_size`` square surrounded by walls. Door ``i`` (between rooms
    ``i`` and ``i + 1``) sits at a random height of their shared wall and opens only with key
    ``i``, which lies in a room before it (see ``key_room``). The agent starts in room ``0``,
    carries at most one key, and opens a door by walking into it with the matching key (the key
    is used up, the door stays open, the agent stays in place). Keys lie on floor cells that can
    be walked over; action ``4`` swaps the carried key with the cell's (pick up, drop or
    exchange).

    **Observation** (``Box(float32)`` of shape ``[view_size * view_size * 5 + 1]``): the
    ``view_size x view_size`` window centred on the agent (row-major, top row first), 5 features
    per cell: wall (also outside the map), locked door, key, goal, and the colour code
    ``(colour + 1) / max(1, rooms - 1)`` of a door or key (``0`` otherwise); then the colour code
    of the carried key (``0`` when empty-handed). The agent's position is not observed.

    **Actions** (``Discrete(5)``): ``0`` up, ``1`` right, ``2`` down, ``3`` left, ``4`` swap key.

    **Reward**: ``door_bonus`` for each door opened, ``goal_reward`` on reaching the goal (which
    terminates the episode), ``0`` otherwise. The episode is truncated after ``max_steps`` steps
    (an internal cap). ``info`` holds ``"doors_opened"``, ``"carrying"`` (a key's colour, or
    ``-1``) and ``"success"``.

    Args:
        rooms (int, optional): number of rooms, ``>= 1`` (``rooms - 1`` doors). Defaults to ``6``.

    Keyword Args:
        room_size (int, optional): inner side of a room, ``>= 2``, with
            ``rooms <= room_size ** 2``. Defaults to ``7``.
        view_size (int, optional): side of the observed window, odd and ``>= 1``.
            Defaults to ``5``.
        key_room (str, optional): where key ``i`` lies: ``"same"`` (room ``i``, just before its
            door: the easiest), ``"earlier"`` (a uniformly drawn room ``0 .. i``) or ``"first"``
            (all keys in room ``0``: the longest memory). Defaults to ``"earlier"``.
        door_bonus (float, optional): reward per door opened, ``>= 0``. Defaults to ``0.1``.
        goal_reward (float, optional): reward at the goal, ``> 0``. Defaults to ``1.0``.
        max_steps (int, optional): step cap before truncation. Defaults to ``None``:
            ``20 * rooms * room_size ** 2`` (``5880`` at the default size).
        render_mode (str, optional): ``None`` or ``"ansi"``. Defaults to ``None``.

    Examples:
        >>> from torchrl_hippo.envs import MultiRoomKeys
        >>> env = MultiRoomKeys(rooms=2, room_size=3, render_mode="ansi")
        >>> obs, info = env.reset(seed=6)
        >>> obs.shape, env.max_steps, info["carrying"]
        ((126,), 360, -1)
        >>> print(env.render())
        #########
        #...#...#
        #.@aAG..#
        #...#...#
        #########
        >>> _ = env.step(1)  # right, onto key "a"
        >>> info = env.step(4)[-1]  # pick it up
        >>> info["carrying"]
        0
        >>> env.step(1)[1:3]  # walk into door "A": it opens, the agent stays
        (0.1, False)
        >>> _ = env.step(1)  # through the doorway
        >>> env.step(1)[1:3]  # the goal
        (1.0, True)
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        rooms: int = 6,
        *,
        room_size: int = 7,
        view_size: int = 5,
        key_room: str = "earlier",
        door_bonus: float = 0.1,
        goal_reward: float = 1.0,
        max_steps: int | None = None,
        render_mode: str | None = None,
    ) -> None:
        self.rooms = check_int("rooms", rooms, minimum=1)
        self.room_size = check_int("room_size", room_size, minimum=2)
        if self.rooms > self.room_size**2:
            raise ValueError(
                f"rooms must be <= room_size ** 2 so that every key fits in the first room, "
                f"got rooms={self.rooms} with room_size={self.room_size}."
            )
        self.view_size = check_int("view_size", view_size, minimum=1)
        if self.view_size % 2 == 0:
            raise ValueError(f"view_size must be an odd int >= 1, got {self.view_size}.")
        self.key_room = check_choice("key_room", key_room, ("same", "earlier", "first"))
        self.door_bonus = check_float("door_bonus", door_bonus, low=0.0)
        self.goal_reward = check_float("goal_reward", goal_reward, low=0.0)
        if self.goal_reward == 0.0:
            raise ValueError("goal_reward must be a number > 0, got 0.0.")
        self.max_steps = (
            20 * self.rooms * self.room_size**2
            if max_steps is None
            else check_int("max_steps", max_steps, minimum=1)
        )
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])

        self.height = self.room_size + 2
        self.width = self.rooms * (self.room_size + 1) + 1
        self._pad = self.view_size // 2
        self._view_dim = self.view_size * self.view_size * _CHANNELS
        self._colour_scale = 1.0 / max(1, self.rooms - 1)
        self.observation_space = spaces.Box(0.0, 1.0, (self._view_dim + 1,), dtype=np.float32)
        self.action_space = spaces.Discrete(5)

        self._cells: list[list[int]] = []
        self._colours: list[list[int]] = []
        self._feat = np.zeros((0, 0, _CHANNELS), dtype=np.float32)
        self._y = self._x = 0
        self._carried = -1
        self._doors_opened = 0
        self._t = -1

    # ----------------------------------------------------------------------------- generation
    def _room_cells(self, room: int) -> tuple[int, int]:
        """Top-left interior cell ``(y, x)`` of a room."""
        return 1, 1 + room * (self.room_size + 1)

    def _free_cell(self, room: int, used: set[tuple[int, int]]) -> tuple[int, int]:
        y0, x0 = self._room_cells(room)
        free = [
            (y0 + i, x0 + j)
            for i in range(self.room_size)
            for j in range(self.room_size)
            if (y0 + i, x0 + j) not in used
        ]
        cell = free[int(self.np_random.integers(len(free)))]
        used.add(cell)
        return cell

    def _generate(self) -> None:
        s, h, w = self.room_size, self.height, self.width
        cells = [[EMPTY] * w for _ in range(h)]
        colours = [[-1] * w for _ in range(h)]
        for x in range(w):
            cells[0][x] = cells[h - 1][x] = WALL
        for room in range(self.rooms + 1):
            for y in range(h):
                cells[y][room * (s + 1)] = WALL
        rng = self.np_random
        door_rows = rng.integers(1, s + 1, size=max(self.rooms - 1, 0)).tolist()
        for i, y in enumerate(door_rows):
            cells[y][(i + 1) * (s + 1)] = DOOR
            colours[y][(i + 1) * (s + 1)] = i
        used: set[tuple[int, int]] = set()
        self._y, self._x = self._free_cell(0, used)
        for i in range(self.rooms - 1):
            if self.key_room == "same":
                room = i
            elif self.key_room == "first":
                room = 0
            else:
                room = int(rng.integers(i + 1))
            y, x = self._free_cell(room, used)
            cells[y][x] = KEY
            colours[y][x] = i
        y, x = self._free_cell(self.rooms - 1, used)
        cells[y][x] = GOAL
        self._goal = (y, x)
        self._cells, self._colours = cells, colours

        # Feature grid, padded with walls, from which each observation window is copied.
        p = self._pad
        feat = np.zeros((h + 2 * p, w + 2 * p, _CHANNELS), dtype=np.float32)
        feat[:, :, 0] = 1.0
        for y in range(h):
            for x in range(w):
                self._paint(y, x, feat)
        self._feat = feat

    def _paint(self, y: int, x: int, feat: np.ndarray | None = None) -> None:
        """Writes cell ``(y, x)``'s features into the padded feature grid."""
        f = (self._feat if feat is None else feat)[y + self._pad, x + self._pad]
        f[:] = 0.0
        code = self._cells[y][x]
        if code != EMPTY:
            f[code - 1] = 1.0
            colour = self._colours[y][x]
            if colour >= 0:
                f[4] = (colour + 1) * self._colour_scale

    # ----------------------------------------------------------------------------- API
    def _observe(self) -> np.ndarray:
        obs = np.empty(self._view_dim + 1, dtype=np.float32)
        v = self.view_size
        obs[:-1].reshape(v, v, _CHANNELS)[...] = self._feat[
            self._y : self._y + v, self._x : self._x + v
        ]
        obs[-1] = (self._carried + 1) * self._colour_scale
        return obs

    def _info(self, success: bool = False) -> dict[str, Any]:
        return {"doors_opened": self._doors_opened, "carrying": self._carried, "success": success}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Generates a new layout. ``options`` is accepted for API compatibility and ignored."""
        super().reset(seed=seed)
        self._generate()
        self._carried = -1
        self._doors_opened = 0
        self._t = 0
        return self._observe(), self._info()

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Moves, opens a door, or swaps a key; see the class docstring for the rules."""
        a = check_action(action, 5)
        if self._t < 0:
            raise RuntimeError("MultiRoomKeys.step() called before reset().")
        self._t += 1
        reward = 0.0
        terminated = False
        y, x = self._y, self._x
        if a < 4:
            ny, nx = y + _DY[a], x + _DX[a]
            code = self._cells[ny][nx]
            if code == EMPTY or code == KEY:
                self._y, self._x = ny, nx
            elif code == GOAL:
                self._y, self._x = ny, nx
                reward, terminated = self.goal_reward, True
            elif code == DOOR and self._colours[ny][nx] == self._carried:
                self._cells[ny][nx] = EMPTY
                self._colours[ny][nx] = -1
                self._paint(ny, nx)
                self._carried = -1
                self._doors_opened += 1
                reward = self.door_bonus
        else:
            code = self._cells[y][x]
            if code == KEY:
                held = self._carried
                self._carried = self._colours[y][x]
                if held >= 0:
                    self._colours[y][x] = held
                else:
                    self._cells[y][x] = EMPTY
                    self._colours[y][x] = -1
                self._paint(y, x)
            elif code == EMPTY and self._carried >= 0:
                self._cells[y][x] = KEY
                self._colours[y][x] = self._carried
                self._carried = -1
                self._paint(y, x)
        truncated = not terminated and self._t >= self.max_steps
        return self._observe(), reward, terminated, truncated, self._info(terminated)

    def render(self) -> str | None:
        """The map as text (``render_mode="ansi"``): ``#`` wall, ``A``.. door, ``a``.. key,
        ``G`` goal, ``@`` agent (letters cycle through the alphabet by colour)."""
        if self.render_mode != "ansi" or not self._cells:
            return None
        rows = []
        for y, line in enumerate(self._cells):
            chars = []
            for x, code in enumerate(line):
                colour = self._colours[y][x]
                if (y, x) == (self._y, self._x):
                    chars.append("@")
                elif code == WALL:
                    chars.append("#")
                elif code == DOOR:
                    chars.append(chr(ord("A") + colour % 26))
                elif code == KEY:
                    chars.append(chr(ord("a") + colour % 26))
                elif code == GOAL:
                    chars.append("G")
                else:
                    chars.append(".")
            rows.append("".join(chars))
        return "\n".join(rows)
