"""A Minecraft-like tech tree on a procedurally generated map, rewarded per new achievement.

The agent gathers wood, places a table, crafts pickaxes, mines stone, coal and iron, builds a
furnace and finally mines diamonds (the chain of Crafter's achievements, without creatures or
survival). It sees only a small window of the map plus its inventory, so it has to remember where
the trees, water, mountains and its own table and furnace are, over episodes of 10,000 steps.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from torchrl_hippo.envs._utils import (
    check_action,
    check_float,
    check_int,
    check_render_mode,
    one_hot_view,
)

__all__ = ["ACHIEVEMENTS", "ACTIONS", "ITEMS", "TILES", "Crafting"]

TILES = (
    "grass",
    "sand",
    "water",
    "stone",
    "path",
    "tree",
    "coal",
    "iron",
    "diamond",
    "table",
    "furnace",
)
GRASS, SAND, WATER, STONE, PATH, TREE, COAL, IRON, DIAMOND, TABLE, FURNACE = range(len(TILES))
_WALKABLE = tuple(t in (GRASS, SAND, PATH) for t in range(len(TILES)))
_BUILDABLE = _WALKABLE  # where a table or furnace can be placed
_STONE_TARGET = tuple(t in (GRASS, SAND, PATH, WATER) for t in range(len(TILES)))
_GLYPHS = ".:~#_Tcidtf"

ITEMS = (
    "wood",
    "stone",
    "coal",
    "iron",
    "diamond",
    "wood_pickaxe",
    "stone_pickaxe",
    "iron_pickaxe",
    "wood_sword",
    "stone_sword",
    "iron_sword",
)
(
    I_WOOD,
    I_STONE,
    I_COAL,
    I_IRON,
    I_DIAMOND,
    I_WOOD_PICKAXE,
    I_STONE_PICKAXE,
    I_IRON_PICKAXE,
    I_WOOD_SWORD,
    I_STONE_SWORD,
    I_IRON_SWORD,
) = range(len(ITEMS))
_MAX_ITEM = 9

ACHIEVEMENTS = (
    "collect_wood",
    "collect_drink",
    "collect_stone",
    "collect_coal",
    "collect_iron",
    "collect_diamond",
    "place_table",
    "place_stone",
    "place_furnace",
    "make_wood_pickaxe",
    "make_stone_pickaxe",
    "make_iron_pickaxe",
    "make_wood_sword",
    "make_stone_sword",
    "make_iron_sword",
)
_ACH = {name: i for i, name in enumerate(ACHIEVEMENTS)}

ACTIONS = (
    "noop",
    "move_left",
    "move_right",
    "move_up",
    "move_down",
    "do",
    "place_stone",
    "place_table",
    "place_furnace",
    "make_wood_pickaxe",
    "make_stone_pickaxe",
    "make_iron_pickaxe",
    "make_wood_sword",
    "make_stone_sword",
    "make_iron_sword",
)
_DY = (0, 0, -1, 1)  # facing: left, right, up, down
_DX = (-1, 1, 0, 0)

# tile mined by "do" -> (inventory item, tool needed or -1, achievement, tile left behind,
# consecutive "do"s needed with hard_mining)
_MINE = {
    TREE: (I_WOOD, -1, _ACH["collect_wood"], TREE, 1),
    STONE: (I_STONE, I_WOOD_PICKAXE, _ACH["collect_stone"], PATH, 2),
    COAL: (I_COAL, I_WOOD_PICKAXE, _ACH["collect_coal"], PATH, 2),
    IRON: (I_IRON, I_STONE_PICKAXE, _ACH["collect_iron"], PATH, 3),
    DIAMOND: (I_DIAMOND, I_IRON_PICKAXE, _ACH["collect_diamond"], PATH, 4),
}
# make_* action -> (item made, {item: cost}, needs furnace)
_RECIPES = {
    9: (I_WOOD_PICKAXE, {I_WOOD: 2}, False),
    10: (I_STONE_PICKAXE, {I_WOOD: 1, I_STONE: 2}, False),
    11: (I_IRON_PICKAXE, {I_WOOD: 1, I_COAL: 1, I_IRON: 1}, True),
    12: (I_WOOD_SWORD, {I_WOOD: 2}, False),
    13: (I_STONE_SWORD, {I_WOOD: 1, I_STONE: 2}, False),
    14: (I_IRON_SWORD, {I_WOOD: 1, I_COAL: 1, I_IRON: 1}, True),
}
_TABLE_COST = 3  # wood
_FURNACE_COST = 3  # stone
_RECIPE_ACH = {
    I_WOOD_PICKAXE: _ACH["make_wood_pickaxe"],
    I_STONE_PICKAXE: _ACH["make_stone_pickaxe"],
    I_IRON_PICKAXE: _ACH["make_iron_pickaxe"],
    I_WOOD_SWORD: _ACH["make_wood_sword"],
    I_STONE_SWORD: _ACH["make_stone_sword"],
    I_IRON_SWORD: _ACH["make_iron_sword"],
}


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise in ``[0, 1]``: a coarse random lattice, interpolated with a smoothstep."""
    lattice = rng.random((h // cell + 2, w // cell + 2))
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = ys - y0, xs - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = lattice[y0][:, x0] * (1 - fx) + lattice[y0][:, x0 + 1] * fx
    bottom = lattice[y0 + 1][:, x0] * (1 - fx) + lattice[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


class Crafting(gym.Env[np.ndarray, np.int64]):
    """A Crafter-like tech tree: gather, craft tools, mine deeper, craft better tools.

    **Map** (``size x size``, generated at each reset from ``self.np_random``): grassland with
    sand-rimmed lakes (water), forests (trees) and mountains (stone) holding coal, iron deeper
    in and diamonds at their core. Grass, sand and path (mined ground) can be walked on. The
    agent spawns on a grass cell away from the mountains and near the centre, facing down.
    Every map holds at least one tree, water, stone, coal, iron and diamond cell.

    **Actions** (``Discrete(15)``, names in :data:`ACTIONS`):

    - ``noop``;
    - ``move_left/right/up/down``: face that way, and step there if the cell can be walked on;
    - ``do``, on the faced cell: a tree gives wood, water a drink; stone and coal need a wood
      pickaxe, iron a stone pickaxe, diamond an iron pickaxe, and become path once mined. With
      ``hard_mining`` they take several ``do`` in a row (stone and coal 2, iron 3, diamond 4;
      any other action starts the count again);
    - ``place_stone`` (1 stone, onto grass, sand, path or water), ``place_table`` (3 wood),
      ``place_furnace`` (3 stone, next to a table), the last two onto grass, sand or path;
    - ``make_wood_pickaxe`` / ``make_wood_sword`` (2 wood each) and ``make_stone_pickaxe`` /
      ``make_stone_sword`` (1 wood and 2 stone each), next to a table;
      ``make_iron_pickaxe`` / ``make_iron_sword`` (1 wood, 1 coal and 1 iron each), next to a
      table and a furnace. "Next to" means within ``nearby`` cells (Chebyshev distance).

    Inventory counts are capped at 9. An action whose requirements are not met does nothing.

    **Reward**: ``1.0`` the first time each of the 15 :data:`ACHIEVEMENTS` is unlocked in the
    episode (``collect_*``, ``place_*``, ``make_*``), else ``0``. Unlocking all of them
    terminates the episode; otherwise it is truncated after ``max_steps`` steps (an internal cap).
    ``info`` holds ``"achievements"`` (how many are unlocked); :attr:`unlocked` lists them.

    **Observation** (``Box(float32)`` of shape ``[view_size ** 2 * 11 + 4 + 11]``): the
    ``view_size x view_size`` window centred on the agent, one-hot over the 11 :data:`TILES`
    per cell (all zeros outside the map; row-major, top row first), then the facing direction
    one-hot (left, right, up, down), then the inventory counts divided by 9 (:data:`ITEMS`).

    Args:
        size (int, optional): side of the square map, ``>= 8``. Defaults to ``48``.

    Keyword Args:
        view_size (int, optional): side of the observed window, odd, ``>= 1``. Defaults to ``7``.
        richness (float, optional): multiplies the ore probabilities (coal, iron, diamond),
            in ``(0, 5]``. Defaults to ``1.0``.
        nearby (int, optional): how far (Chebyshev distance) a table or furnace may be for
            crafting, ``>= 1``. Defaults to ``1``.
        hard_mining (bool, optional): mining takes several ``do`` in a row (see above).
            Defaults to ``True``.
        max_steps (int, optional): step cap before truncation. Defaults to ``10_000``.
        render_mode (str, optional): ``None`` or ``"ansi"``. Defaults to ``None``.

    Examples:
        >>> from torchrl_hippo.envs import Crafting
        >>> from torchrl_hippo.envs.crafting import ACTIONS
        >>> env = Crafting(size=16, view_size=5)
        >>> obs, info = env.reset(seed=0)
        >>> obs.shape, env.max_steps
        ((290,), 10000)
        >>> obs, reward, terminated, truncated, info = env.step(ACTIONS.index("noop"))
        >>> reward, info["achievements"], env.unlocked
        (0.0, 0, [])
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        size: int = 48,
        *,
        view_size: int = 7,
        richness: float = 1.0,
        nearby: int = 1,
        hard_mining: bool = True,
        max_steps: int = 10_000,
        render_mode: str | None = None,
    ) -> None:
        self.size = check_int("size", size, minimum=8)
        self.view_size = check_int("view_size", view_size, minimum=1)
        if self.view_size % 2 == 0:
            raise ValueError(f"view_size must be an odd int >= 1, got {self.view_size}.")
        self.richness = check_float("richness", richness, low=0.0, high=5.0)
        if self.richness == 0.0:
            raise ValueError("richness must be a number in (0, 5], got 0.0.")
        self.nearby = check_int("nearby", nearby, minimum=1)
        if not isinstance(hard_mining, (bool, np.bool_)):
            raise TypeError(f"hard_mining must be a bool, got {hard_mining!r}.")
        self.hard_mining = bool(hard_mining)
        self.max_steps = check_int("max_steps", max_steps, minimum=1)
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])

        self._pad = self.view_size // 2
        self._view_dim = self.view_size**2 * len(TILES)
        dim = self._view_dim + 4 + len(ITEMS)
        self.observation_space = spaces.Box(0.0, 1.0, (dim,), dtype=np.float32)
        self.action_space = spaces.Discrete(len(ACTIONS))

        self._tiles: list[list[int]] = []
        self._feat = np.zeros((0, 0, len(TILES)), dtype=np.float32)
        self._tail = np.zeros(4 + len(ITEMS), dtype=np.float32)  # facing + inventory
        self._inventory = [0] * len(ITEMS)
        self._done_ach = [False] * len(ACHIEVEMENTS)
        self._n_ach = 0
        self._y = self._x = 0
        self._facing = 3
        self._hits = 0  # consecutive "do"s on the faced cell
        self._t = -1

    # ----------------------------------------------------------------------------- generation
    def _generate(self) -> None:
        n, rng = self.size, self.np_random
        water = _value_noise(rng, n, n, 8)
        mountain = _value_noise(rng, n, n, 10)
        forest = _value_noise(rng, n, n, 5)
        u, v = rng.random((n, n)), rng.random((n, n))
        r = self.richness
        tiles = np.full((n, n), GRASS, dtype=np.int64)
        hill = mountain > 0.62
        tiles[(water < 0.3) & ~hill] = SAND
        tiles[(water < 0.22) & ~hill] = WATER
        tiles[(tiles == GRASS) & (forest > 0.55) & (v < 0.35)] = TREE
        tiles[hill] = STONE
        tiles[hill & (u < 0.08 * r)] = COAL
        tiles[(mountain > 0.7) & (u >= 0.08 * r) & (u < 0.12 * r)] = IRON
        tiles[(mountain > 0.78) & (u >= 0.12 * r) & (u < 0.14 * r)] = DIAMOND

        # Spawn on the grass cell lowest in the mountain noise (so away from the mountains),
        # preferring cells near the centre, with its neighbourhood cleared.
        ys, xs = np.nonzero(tiles == GRASS)
        if len(ys) == 0:
            ys, xs = np.array([n // 2]), np.array([n // 2])
        centre = np.hypot(ys - n / 2, xs - n / 2) / n
        k = int(np.argmin(mountain[ys, xs] + centre))
        sy, sx = int(ys[k]), int(xs[k])
        tiles[max(sy - 1, 0) : sy + 2, max(sx - 1, 0) : sx + 2] = GRASS

        # Every resource exists at least once: the ores at the deepest mountain cells left,
        # trees and water at random grass cells away from the spawn.
        yy, xx = np.mgrid[0:n, 0:n]
        far = (np.abs(yy - sy) > 1) | (np.abs(xx - sx) > 1)
        order = np.argsort(-mountain, axis=None, kind="stable")
        for ore in (DIAMOND, IRON, COAL, STONE):
            if not (tiles == ore).any():
                host = far & np.isin(tiles, (STONE, GRASS, SAND))
                flat = order[host.ravel()[order]][0]
                tiles.flat[flat] = ore
        for feature in (TREE, WATER):
            if not (tiles == feature).any():
                ys, xs = np.nonzero((tiles == GRASS) & far)
                k = int(rng.integers(len(ys)))
                tiles[ys[k], xs[k]] = feature

        self._tiles = tiles.tolist()
        self._y, self._x = sy, sx
        self._feat = one_hot_view(tiles, len(TILES), pad=self._pad)

    def _set_tile(self, y: int, x: int, tile: int) -> None:
        self._tiles[y][x] = tile
        f = self._feat[y + self._pad, x + self._pad]
        f[:] = 0.0
        f[tile] = 1.0

    # ----------------------------------------------------------------------------- helpers
    def _near(self, tile: int) -> bool:
        d, n = self.nearby, self.size
        for y in range(max(self._y - d, 0), min(self._y + d + 1, n)):
            row = self._tiles[y]
            for x in range(max(self._x - d, 0), min(self._x + d + 1, n)):
                if row[x] == tile:
                    return True
        return False

    def _add(self, item: int, amount: int) -> None:
        count = min(self._inventory[item] + amount, _MAX_ITEM)
        self._inventory[item] = count
        self._tail[4 + item] = count / _MAX_ITEM

    def _unlock(self, achievement: int) -> float:
        if self._done_ach[achievement]:
            return 0.0
        self._done_ach[achievement] = True
        self._n_ach += 1
        return 1.0

    @property
    def unlocked(self) -> list[str]:
        """Names of the achievements unlocked in the current episode."""
        return [name for name, done in zip(ACHIEVEMENTS, self._done_ach) if done]

    @property
    def inventory(self) -> dict[str, int]:
        """The inventory counts by item name."""
        return dict(zip(ITEMS, self._inventory))

    # ----------------------------------------------------------------------------- API
    def _observe(self) -> np.ndarray:
        obs = np.empty(self.observation_space.shape[0], dtype=np.float32)
        v, vd = self.view_size, self._view_dim
        obs[:vd].reshape(v, v, len(TILES))[...] = self._feat[
            self._y : self._y + v, self._x : self._x + v
        ]
        obs[vd:] = self._tail
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Generates a new map. ``options`` is accepted for API compatibility and ignored."""
        super().reset(seed=seed)
        self._generate()
        self._inventory = [0] * len(ITEMS)
        self._done_ach = [False] * len(ACHIEVEMENTS)
        self._n_ach = 0
        self._facing = 3
        self._hits = 0
        self._tail[:] = 0.0
        self._tail[self._facing] = 1.0
        self._t = 0
        return self._observe(), {"achievements": 0}

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Applies one action; see the class docstring for the rules."""
        a = check_action(action, len(ACTIONS))
        if self._t < 0:
            raise RuntimeError("Crafting.step() called before reset().")
        self._t += 1
        reward = 0.0
        if 1 <= a <= 4:
            d = a - 1
            if d != self._facing:
                self._tail[self._facing] = 0.0
                self._tail[d] = 1.0
                self._facing = d
            ny, nx = self._y + _DY[d], self._x + _DX[d]
            if 0 <= ny < self.size and 0 <= nx < self.size and _WALKABLE[self._tiles[ny][nx]]:
                self._y, self._x = ny, nx
        elif a >= 5:
            reward = self._act(a)
        if a != 5:
            self._hits = 0
        terminated = self._n_ach == len(ACHIEVEMENTS)
        truncated = not terminated and self._t >= self.max_steps
        return self._observe(), reward, terminated, truncated, {"achievements": self._n_ach}

    def _act(self, a: int) -> float:
        """The interaction and crafting actions (``a >= 5``); returns the reward."""
        inv = self._inventory
        if a in _RECIPES:
            item, cost, furnace = _RECIPES[a]
            if (
                all(inv[i] >= c for i, c in cost.items())
                and self._near(TABLE)
                and (not furnace or self._near(FURNACE))
            ):
                for i, c in cost.items():
                    self._add(i, -c)
                self._add(item, 1)
                return self._unlock(_RECIPE_ACH[item])
            return 0.0
        ty, tx = self._y + _DY[self._facing], self._x + _DX[self._facing]
        if not (0 <= ty < self.size and 0 <= tx < self.size):
            return 0.0
        tile = self._tiles[ty][tx]
        if a == 5:  # do
            if tile == WATER:
                return self._unlock(_ACH["collect_drink"])
            if tile in _MINE:
                item, tool, achievement, left, hits = _MINE[tile]
                if tool >= 0 and inv[tool] == 0:
                    return 0.0
                if self.hard_mining:
                    self._hits += 1
                    if self._hits < hits:
                        return 0.0
                    self._hits = 0
                self._add(item, 1)
                if left != tile:
                    self._set_tile(ty, tx, left)
                return self._unlock(achievement)
        elif a == 6:  # place_stone
            if inv[I_STONE] >= 1 and _STONE_TARGET[tile]:
                self._add(I_STONE, -1)
                self._set_tile(ty, tx, STONE)
                return self._unlock(_ACH["place_stone"])
        elif a == 7:  # place_table
            if inv[I_WOOD] >= _TABLE_COST and _BUILDABLE[tile]:
                self._add(I_WOOD, -_TABLE_COST)
                self._set_tile(ty, tx, TABLE)
                return self._unlock(_ACH["place_table"])
        elif a == 8:  # place_furnace
            if inv[I_STONE] >= _FURNACE_COST and _BUILDABLE[tile] and self._near(TABLE):
                self._add(I_STONE, -_FURNACE_COST)
                self._set_tile(ty, tx, FURNACE)
                return self._unlock(_ACH["place_furnace"])
        return 0.0

    def render(self) -> str | None:
        """The map as text (``render_mode="ansi"``), one glyph per tile (``.:~#_Tcidtf`` in the
        order of :data:`TILES`), ``@`` for the agent, then the inventory."""
        if self.render_mode != "ansi" or not self._tiles:
            return None
        rows = []
        for y, line in enumerate(self._tiles):
            chars = [_GLYPHS[t] for t in line]
            if y == self._y:
                chars[self._x] = "@"
            rows.append("".join(chars))
        items = ", ".join(f"{k}={v}" for k, v in self.inventory.items() if v)
        rows.append(f"t={max(self._t, 0)} inventory: {items or '-'}")
        return "\n".join(rows)
