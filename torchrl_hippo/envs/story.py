"""Procedural story generation: write a plot, token by token, that keeps promises made long ago.

Each episode generates a small world (characters, places, objects) and a list of goals, each due
at the end of some chapter ("by the end of chapter 5, Cleo must hold the lantern"). The goals
are shown once, in a prologue, and the agent then writes the story as a stream of events of
three tokens (verb, character, argument). Only the tokens of the current event are observed, so
the agent must remember the goals for up to thousands of steps and keep track of the world its
own story has built.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from torchrl_hippo.envs._utils import check_action, check_float, check_int, check_render_mode

__all__ = ["GOAL_KINDS", "VERBS", "StoryGen"]

VERBS = ("go", "take", "drop", "give", "meet")
GO, TAKE, DROP, GIVE, MEET = range(len(VERBS))
GOAL_KINDS = ("have", "at", "met")
HAVE, AT, MET = range(len(GOAL_KINDS))

_CHARACTERS = ("Ada", "Bram", "Cleo", "Dov", "Esme", "Finn", "Gus", "Hana", "Ivo", "Juno")
_LOCATIONS = ("the mill", "the harbour", "the tower", "the forest", "the market", "the crypt")
_OBJECTS = ("the lantern", "the map", "the key", "the sword", "the letter", "the ring")


def _names(pool: tuple[str, ...], n: int) -> list[str]:
    return [
        pool[i % len(pool)] + ("" if i < len(pool) else f" {i // len(pool) + 1}") for i in range(n)
    ]


class StoryGen(gym.Env[np.ndarray, np.int64]):
    """Write a story whose events satisfy goals announced thousands of steps earlier.

    **World** (drawn at reset): ``characters`` characters and ``objects`` objects, each at one of
    ``locations`` places. A character holds at most one object and carries it along.

    **Episode**: a prologue of one step per goal (the goal is shown, the action ignored), then
    ``chapters`` chapters of ``events_per_chapter`` events, each written as three tokens, one
    per step: a verb, a character (the subject), and an argument. The vocabulary
    (:attr:`vocabulary`) is the verbs, then the characters, places and objects; every action is a
    token (``Discrete(5 + characters + locations + objects)``). The plot grammar:

    =========================  ==============================================================
    event                      coherent when (otherwise it changes nothing)
    =========================  ==============================================================
    ``go <c> <place>``         always; ``c`` moves there (with what it holds)
    ``take <c> <object>``      the object lies where ``c`` is and ``c`` holds nothing
    ``drop <c> <object>``      ``c`` holds it; it then lies where ``c`` is
    ``give <c> <d>``           ``c`` holds something, ``d`` holds nothing, same place, ``c != d``
    ``meet <c> <d>``           same place, ``c != d``; they have met from then on
    =========================  ==============================================================

    A token of the wrong kind for its slot makes the event incoherent too.

    **Goals**: ``goals_per_chapter`` per chapter, on distinct characters: ``have c o`` (``c``
    holds ``o``; distinct objects within a chapter), ``at c place`` (never ``c``'s starting
    place) or ``met c d``. All of a chapter's goals can hold at once, and ``4`` events always
    suffice for one, so a story can satisfy every goal.

    **Reward**: at the last event of each chapter, ``1.0`` per goal due then that holds, minus
    ``incoherence_penalty`` on each incoherent event (``0`` by default): the reward is nonzero
    on at most ``chapters`` steps. The episode terminates after the last chapter
    (``prologue + 3 * chapters * events_per_chapter`` steps, ``3096`` by default).

    **Observation** (``Box(float32)``; :attr:`layout` names its slices): the phase (prologue,
    verb next, subject next, argument next); during the prologue the goal shown (kind one-hot,
    its subject and argument as vocabulary one-hots, due chapter one-hot); the tokens already
    written for the current event (two vocabulary one-hots); whether the last event was coherent
    / incoherent; the progress (chapter, event within it, as fractions); with
    ``show_world=True``, each character's place and held object (one-hots). ``info`` holds
    ``"goals_met"``, ``"incoherent"`` (events so far) and ``"chapter"``.

    Keyword Args:
        characters (int, optional): ``>= 2``. Defaults to ``6``.
        locations (int, optional): ``>= 2``. Defaults to ``5``.
        objects (int, optional): ``>= 1``. Defaults to ``6``.
        chapters (int, optional): ``>= 1``. Defaults to ``8``.
        events_per_chapter (int, optional): ``>= 4 * goals_per_chapter``. Defaults to ``128``.
        goals_per_chapter (int, optional): in ``[1, characters]``. Defaults to ``3``.
        show_world (bool, optional): observe the world state (an easier, less memory-bound
            variant). Defaults to ``False``.
        incoherence_penalty (float, optional): reward subtracted per incoherent event, ``>= 0``.
            Defaults to ``0.0``.
        render_mode (str, optional): ``None`` or ``"ansi"``. Defaults to ``None``.

    Examples:
        >>> from torchrl_hippo.envs import StoryGen
        >>> env = StoryGen(chapters=1, events_per_chapter=4, goals_per_chapter=1,
        ...                render_mode="ansi")
        >>> obs, info = env.reset(seed=14)
        >>> env.goal_text(0)
        'by the end of chapter 1, Ada must be at the forest'
        >>> _ = env.step(0)  # the prologue shows the goal; this token is ignored
        >>> tokens = ["go", "Ada", "the forest"]
        >>> for token in tokens:
        ...     obs, reward, terminated, truncated, info = env.step(env.vocabulary.index(token))
        >>> print(env.render())
        chapter 1/1, event 1/4: Ada goes to the forest.
        >>> for _ in range(3):  # three more (incoherent) events to finish the chapter
        ...     for _ in range(3):
        ...         obs, reward, terminated, truncated, info = env.step(0)
        >>> reward, terminated, info["goals_met"]
        (1.0, True, 1)
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}  # noqa: RUF012

    def __init__(
        self,
        *,
        characters: int = 6,
        locations: int = 5,
        objects: int = 6,
        chapters: int = 8,
        events_per_chapter: int = 128,
        goals_per_chapter: int = 3,
        show_world: bool = False,
        incoherence_penalty: float = 0.0,
        render_mode: str | None = None,
    ) -> None:
        self.characters = check_int("characters", characters, minimum=2)
        self.locations = check_int("locations", locations, minimum=2)
        self.objects = check_int("objects", objects, minimum=1)
        self.chapters = check_int("chapters", chapters, minimum=1)
        self.goals_per_chapter = check_int(
            "goals_per_chapter", goals_per_chapter, minimum=1, maximum=self.characters
        )
        self.events_per_chapter = check_int(
            "events_per_chapter", events_per_chapter, minimum=4 * self.goals_per_chapter
        )
        if not isinstance(show_world, (bool, np.bool_)):
            raise TypeError(f"show_world must be a bool, got {show_world!r}.")
        self.show_world = bool(show_world)
        self.incoherence_penalty = check_float("incoherence_penalty", incoherence_penalty, low=0.0)
        self.render_mode = check_render_mode(render_mode, self.metadata["render_modes"])

        c, n_loc, n_obj = self.characters, self.locations, self.objects
        self.character_names = _names(_CHARACTERS, c)
        self.location_names = _names(_LOCATIONS, n_loc)
        self.object_names = _names(_OBJECTS, n_obj)
        self.vocabulary = [*VERBS, *self.character_names, *self.location_names, *self.object_names]
        self._c0 = len(VERBS)  # first character token
        self._l0 = self._c0 + c  # first place token
        self._o0 = self._l0 + n_loc  # first object token
        v = len(self.vocabulary)
        self.n_goals = self.chapters * self.goals_per_chapter
        self.max_steps = self.n_goals + 3 * self.chapters * self.events_per_chapter

        sizes = {
            "phase": 4,
            "goal_kind": len(GOAL_KINDS),
            "goal_subject": v,
            "goal_argument": v,
            "goal_chapter": self.chapters,
            "verb": v,
            "subject": v,
            "last_event": 2,
            "progress": 2,
        }
        if self.show_world:
            sizes["places"] = c * n_loc
            sizes["holding"] = c * (n_obj + 1)
        self.layout: dict[str, slice] = {}
        start = 0
        for name, size in sizes.items():
            self.layout[name] = slice(start, start + size)
            start += size
        self.observation_space = spaces.Box(0.0, 1.0, (start,), dtype=np.float32)
        self.action_space = spaces.Discrete(v)
        self._n_actions = v
        self._buf = np.zeros(start, dtype=np.float32)
        self._world_buf = np.zeros(c * n_loc + c * (n_obj + 1), dtype=np.float32)

        self._t = -1
        self.goals: list[tuple[int, int, int, int]] = []  # (kind, subject, argument, chapter)
        self._loc: list[int] = []
        self._holding: list[int] = []
        self._obj_loc: list[int] = []
        self._holder: list[int] = []
        self._met: list[list[bool]] = []
        self._slot = 0
        self._tokens = [0, 0]
        self._chapter = self._event = 0
        self._goals_met = self._incoherent = 0
        self._last: tuple[int, int, int, bool] | None = None

    # ----------------------------------------------------------------------------- world
    def _generate(self) -> None:
        rng = self.np_random
        c, n_loc, n_obj = self.characters, self.locations, self.objects
        self._loc = rng.integers(n_loc, size=c).tolist()
        self._obj_loc = rng.integers(n_loc, size=n_obj).tolist()
        self._holding = [-1] * c
        self._holder = [-1] * n_obj
        self._met = [[False] * c for _ in range(c)]
        goals = []
        for chapter in range(self.chapters):
            subjects = rng.permutation(c)[: self.goals_per_chapter].tolist()
            free_objects = rng.permutation(n_obj).tolist()
            for s in subjects:
                kind = int(rng.integers(len(GOAL_KINDS)))
                if kind == HAVE and not free_objects:
                    kind = AT
                if kind == HAVE:
                    arg = free_objects.pop()
                elif kind == AT:
                    arg = (self._loc[s] + 1 + int(rng.integers(n_loc - 1))) % n_loc
                else:
                    arg = (s + 1 + int(rng.integers(c - 1))) % c
                goals.append((kind, s, arg, chapter))
        self.goals = goals

    def _goal_holds(self, goal: tuple[int, int, int, int]) -> bool:
        kind, s, arg, _ = goal
        if kind == HAVE:
            return self._holding[s] == arg
        if kind == AT:
            return self._loc[s] == arg
        return self._met[s][arg]

    def _apply(self, verb: int, subject: int, arg: int) -> bool:
        """Applies an event if it is coherent; returns whether it was."""
        c = subject - self._c0
        if not (0 <= verb < len(VERBS) and 0 <= c < self.characters):
            return False
        if verb == GO:
            place = arg - self._l0
            if not 0 <= place < self.locations:
                return False
            self._loc[c] = place
            return True
        if verb == TAKE or verb == DROP:
            o = arg - self._o0
            if not 0 <= o < self.objects:
                return False
            if verb == TAKE:
                if (
                    self._holder[o] >= 0
                    or self._obj_loc[o] != self._loc[c]
                    or self._holding[c] >= 0
                ):
                    return False
                self._holder[o], self._holding[c] = c, o
            else:
                if self._holding[c] != o:
                    return False
                self._holder[o], self._holding[c] = -1, -1
                self._obj_loc[o] = self._loc[c]
            return True
        d = arg - self._c0
        if not 0 <= d < self.characters or d == c or self._loc[c] != self._loc[d]:
            return False
        if verb == GIVE:
            o = self._holding[c]
            if o < 0 or self._holding[d] >= 0:
                return False
            self._holding[c], self._holding[d], self._holder[o] = -1, o, d
            return True
        self._met[c][d] = self._met[d][c] = True
        return True

    def goal_text(self, index: int) -> str:
        """The goal ``index`` (as listed in :attr:`goals`) in words."""
        kind, s, arg, chapter = self.goals[index]
        who = self.character_names[s]
        if kind == HAVE:
            what = f"{who} must hold {self.object_names[arg]}"
        elif kind == AT:
            what = f"{who} must be at {self.location_names[arg]}"
        else:
            what = f"{who} must have met {self.character_names[arg]}"
        return f"by the end of chapter {chapter + 1}, {what}"

    # ----------------------------------------------------------------------------- API
    def _observe(self) -> np.ndarray:
        buf, lay = self._buf, self.layout
        buf.fill(0.0)
        t = self._t
        if t < self.n_goals:
            kind, s, arg, chapter = self.goals[t]
            buf[0] = 1.0
            buf[lay["goal_kind"].start + kind] = 1.0
            buf[lay["goal_subject"].start + self._c0 + s] = 1.0
            arg0 = (self._o0, self._l0, self._c0)[kind]
            buf[lay["goal_argument"].start + arg0 + arg] = 1.0
            buf[lay["goal_chapter"].start + chapter] = 1.0
        else:
            slot = self._slot
            buf[1 + slot] = 1.0
            if slot >= 1:
                buf[lay["verb"].start + self._tokens[0]] = 1.0
            if slot == 2:
                buf[lay["subject"].start + self._tokens[1]] = 1.0
        if self._last is not None:
            buf[lay["last_event"].start + (0 if self._last[3] else 1)] = 1.0
        p = lay["progress"].start
        buf[p] = self._chapter / self.chapters
        buf[p + 1] = self._event / self.events_per_chapter
        if self.show_world:
            buf[lay["places"].start :] = self._world_buf
        return buf.copy()

    def _paint_world(self) -> None:
        w = self._world_buf
        w.fill(0.0)
        n_loc, hold0 = self.locations, self.characters * self.locations
        for c in range(self.characters):
            w[c * n_loc + self._loc[c]] = 1.0
            w[hold0 + c * (self.objects + 1) + self._holding[c] + 1] = 1.0

    def _info(self) -> dict[str, Any]:
        return {
            "goals_met": self._goals_met,
            "incoherent": self._incoherent,
            "chapter": self._chapter,
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draws a new world and its goals. ``options`` is accepted for API compatibility and
        ignored."""
        super().reset(seed=seed)
        self._generate()
        self._t = 0
        self._slot = 0
        self._tokens = [0, 0]
        self._chapter = self._event = 0
        self._goals_met = self._incoherent = 0
        self._last = None
        if self.show_world:
            self._paint_world()
        return self._observe(), self._info()

    def step(self, action: np.int64 | int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Writes one token (ignored during the prologue); see the class docstring."""
        a = check_action(action, self._n_actions)
        if self._t < 0:
            raise RuntimeError("StoryGen.step() called before reset().")
        self._t += 1
        reward = 0.0
        terminated = False
        if self._t <= self.n_goals:
            pass  # prologue: the token is ignored
        elif self._slot < 2:
            self._tokens[self._slot] = a
            self._slot += 1
        else:
            verb, subject = self._tokens
            coherent = self._apply(verb, subject, a)
            self._last = (verb, subject, a, coherent)
            if not coherent:
                self._incoherent += 1
                reward -= self.incoherence_penalty
            elif self.show_world:
                self._paint_world()
            self._slot = 0
            self._event += 1
            if self._event == self.events_per_chapter:
                chapter = self._chapter
                for goal in self.goals[
                    chapter * self.goals_per_chapter : (chapter + 1) * self.goals_per_chapter
                ]:
                    if self._goal_holds(goal):
                        reward += 1.0
                        self._goals_met += 1
                self._event = 0
                self._chapter = chapter + 1
                terminated = self._chapter == self.chapters
        return self._observe(), reward, terminated, False, self._info()

    def _event_text(self, verb: int, subject: int, arg: int) -> str:
        words = [self.vocabulary[verb], self.vocabulary[subject], self.vocabulary[arg]]
        if verb >= len(VERBS) or not self._c0 <= subject < self._l0:
            return " ".join(words) + "?"
        who, what = words[1], words[2]
        phrase = {
            GO: f"{who} goes to {what}",
            TAKE: f"{who} takes {what}",
            DROP: f"{who} drops {what}",
            GIVE: f"{who} gives what they hold to {what}",
            MEET: f"{who} meets {what}",
        }[verb]
        return phrase + "."

    def render(self) -> str | None:
        """The last event in words (``render_mode="ansi"``); incoherent ones end with ``(?)``."""
        if self.render_mode != "ansi" or self._t < 0:
            return None
        if self._t < self.n_goals:
            return f"prologue {self._t + 1}/{self.n_goals}: {self.goal_text(self._t)}"
        if self._last is None:
            return f"chapter {self._chapter + 1}/{self.chapters}: the story begins."
        verb, subject, arg, coherent = self._last
        chapter, event = self._chapter, self._event
        if event == 0:  # the event closed a chapter
            chapter, event = chapter - 1, self.events_per_chapter
        text = self._event_text(verb, subject, arg)
        return (
            f"chapter {chapter + 1}/{self.chapters}, event {event}/{self.events_per_chapter}: "
            f"{text}{'' if coherent else ' (?)'}"
        )
