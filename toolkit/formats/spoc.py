"""SPOC / CHORES datasets (Ehsani et al., 2024, "SPOC: Imitating Shortest Paths in Simulation"; the layout
FLaRe fine-tunes from): reader.

Layout, as read by SPOC's own loader (github.com/allenai/spoc-robot-training,
``training/offline/chores_dataset.py``, ``ChoresDataReader``)::

    <root>/house_id_to_sub_house_id_<split>.json     {"<house_id>": ["<episode>", ...], ...}
    <root>/<split>/<house_id>/hdf5_sensors.hdf5      one group per episode, named <episode>
    <root>/<split>/<house_id>/raw_navigation_camera__<episode>.mp4
    <root>/<split>/<house_id>/raw_manipulation_camera__<episode>.mp4

Sensors of an episode group, one row per step ``t = 0 .. T-1`` (``environment/navigation_sensors.py``,
``utils/string_utils.py``): strings are uint8 rows (``np.array([s], dtype=f"S{n}").view("uint8")``,
NUL-padded) — ``last_action_str`` ``[T, 200]`` (the action taken to *reach* step t; row 0 is the empty
null action), ``templated_task_spec`` ``[T, n]`` (the task spec as JSON; every row the same);
``last_agent_location`` float ``[T, 6]`` = position x, y, z and rotation x, y, z (degrees; y is the
heading); ``an_object_is_in_hand`` ``[T, 1]`` (absent in navigation-only data: zeros, as SPOC does); other
per-step sensors (``last_action_success``, ``house_index``, ``rooms_seen``, bounding boxes ...) may be
present. Each MP4 has T frames, frame t showing step t.

Alignment (SPOC's loader: ``actions = last_action_str[1:]``, frames ``[:-1]``, sensors ``[:-1]``): step
t of an episode is frame t and the sensors of row t, and the action taken there is
``last_action_str[t + 1]``; the last row has no action and is dropped, so an episode of T rows has
``L = T - 1`` steps. A video whose frame count is not T is an error (SPOC asserts the same).

Actions: indices ``[L, 1]`` (float32) into ``ACTIONS``, SPOC's ``ALL_STRETCH_ACTIONS``
(``utils/constants/stretch_initialization_utils.py``; short strings from ``THORActions`` in
``utils/type_utils.py``): m (move ahead), r, l (rotate right/left 30 deg), b (move back), end (done),
sub_done, ls, rs (rotate left/right 6 deg), p (pickup), zm, zp (arm in/out), yp, ym (arm up/down), wp, wm
(wrist open/close), yms, zms, zps, yps (small arm moves), d (dropoff). An unknown string is an error.

``state`` float32 ``[L, D]``: the components named by ``state_keys``, default
``("x", "z", "yaw", "in_hand")`` — agent position x and z (m), heading (rotation y, degrees, as stored)
and whether an object is in hand (0/1). Also accepted: ``y``, ``rot_x``, ``rot_z``, and the name of any
other numeric per-step sensor of the group (flattened per step).

Images: ``rgb_navigation`` and ``rgb_manipulation`` uint8 ``[L, H, W, 3]`` (option ``cameras``, any of
``navigation``/``manipulation``), decoded with ``toolkit.datamodules.video.Decoder``. ``rewards`` zeros
(SPOC stores none), ``dones`` 1 on the last step. ``attrs``: ``instruction`` (below), ``task_type``,
``task_spec`` (the JSON), ``house_id``, ``episode``, ``source`` ("spoc"), and ``success`` only where a
``hypothetical_task_success`` sensor was recorded (its last value).

Instruction: the templated spec holds no natural-language field (SPOC renders one with random verbs and
WordNet lemmas, ``utils/task_spec_to_instruction.py``). In order: a ``task_natural_language_spec`` sensor
if recorded; a ``natural_language_spec`` key in the spec JSON (the ``TaskSpec`` field,
``tasks/task_specs.py``); else SPOC's template for the task type rendered deterministically: the first of
SPOC's verbs ("go to", "pick up"), the object named by its synset's head word (``apple.n.01`` -> apple).

Episode names ``<house_id>/<episode>``, houses and episodes in natural order. Without the JSON index, the
houses found under ``<root>/<split>/`` and the groups of their sensor files are used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from toolkit.errors import ToolkitError
from toolkit.formats.episode import Episode

ACTIONS: tuple[str, ...] = ("m", "r", "l", "b", "end", "sub_done", "ls", "rs", "p", "zm", "zp", "yp", "ym",
                            "wp", "wm", "yms", "zms", "zps", "yps", "d")
ACTION_INDEX = {a: i for i, a in enumerate(ACTIONS)}
CAMERAS = ("navigation", "manipulation")
DEFAULT_STATE_KEYS = ("x", "z", "yaw", "in_hand")
_LOCATION = {"x": 0, "y": 1, "z": 2, "rot_x": 3, "yaw": 4, "rot_z": 5}
GOTO_VERB, PICKUP_VERB = "go to", "pick up"  # the first of SPOC's GOTO_VERBS and PICKUP_VERBS


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def decode_strings(rows: np.ndarray) -> list[str]:
    """SPOC's string sensors: uint8 rows of NUL-padded bytes (or plain byte strings) -> str per row."""
    rows = np.asarray(rows)
    if rows.dtype.kind in "SO":
        return [r.decode() if isinstance(r, bytes) else str(r) for r in rows.reshape(len(rows), -1)[:, 0]]
    rows = np.ascontiguousarray(rows.astype(np.uint8).reshape(len(rows), -1))
    return [b.decode() for b in rows.view(f"S{rows.shape[1]}")[:, 0]] if rows.shape[1] else [""] * len(rows)


def _noun(synset_or_name: str) -> str:
    """``apple.n.01`` -> ``apple``; ``Living_Room`` -> ``living room``."""
    word = synset_or_name.split(".n.")[0] if ".n." in synset_or_name else synset_or_name
    return word.replace("_", " ").strip().lower()


def _det(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def instruction_from_spec(spec: dict[str, Any]) -> str | None:
    """SPOC's instruction template for a templated task spec, with fixed verbs; None for types without one."""
    t = str(spec.get("task_type", ""))
    obj = _noun(spec["synsets"][0]) if spec.get("synsets") else None
    if t in ("ObjectNavType", "EasyObjectNavType") and obj:
        return f"{GOTO_VERB} {_det(obj)}"
    if t in ("FetchType", "EasyFetchType") and obj:
        return f"{GOTO_VERB} {_det(obj)} and {PICKUP_VERB} that {obj}"
    if t == "PickupType" and obj:
        return f"{PICKUP_VERB} {_det(obj)}"
    if t == "ObjectNavRoom" and obj and spec.get("room_type"):
        return f"{GOTO_VERB} {_det(obj)} in the {_noun(spec['room_type'])}"
    if t == "ObjectNavAffordance" and obj and spec.get("affordance"):
        return f"{GOTO_VERB} {_det(obj + ' that can best be used for ' + _noun(spec['affordance']))}"
    if t == "ObjectNavRelAttribute" and obj and spec.get("rel_attribute") and spec.get("room_type"):
        rel = spec["rel_attribute"]
        if isinstance(rel, (list, tuple)):
            how = "to" if _noun(rel[0]) == "closest" else "from"
            phrase = f"{obj} {_noun(rel[0])} {how} the {_noun(rel[1])}"
        else:
            phrase = f"{_noun(rel)} {obj}"
        return f"{GOTO_VERB} the {phrase} in the {_noun(spec['room_type'])}"
    if t == "ObjectNavLocalRef" and obj and spec.get("reference_synsets"):
        refs = [_det(_noun(s)) for s in spec["reference_synsets"]]
        near = spec.get("reference_type") == "near" and len(refs) > 1
        ref = f"near {refs[0]} and {refs[1]}" if near else f"on {refs[0]}"
        return f"{GOTO_VERB} {_det(obj)} {ref}"
    if t == "RoomNav" and spec.get("room_types"):
        return f"{GOTO_VERB} {_det(_noun(spec['room_types'][0]))}"
    if t == "RoomVisit" and "num_rooms_in_house" in spec:
        return (f"go to all {spec['num_rooms_in_house']} rooms in the house. "
                f"indicate when you have seen a new room and when you are done")
    return None


class SpocReader:
    """Episodes of a SPOC/CHORES dataset split."""

    def __init__(self, path: str | Path, split: str = "train", cameras: str | list[str] | tuple[str, ...] = CAMERAS,
                 state_keys: str | list[str] | tuple[str, ...] = DEFAULT_STATE_KEYS,
                 video_backend: str = "decord") -> None:
        self.root = Path(path)
        self.split = split
        cams = [cameras] if isinstance(cameras, str) else list(cameras)
        self.cameras = [c.removeprefix("raw_").removesuffix("_camera") for c in cams]
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown:
            raise ToolkitError(f"SPOC cameras {unknown}: use any of {', '.join(CAMERAS)}")
        self.state_keys = [state_keys] if isinstance(state_keys, str) else list(state_keys)
        self.video_backend = video_backend
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise ToolkitError(f"SPOC dataset {self.root} has no split folder {split_dir.name}/ "
                               f"(expected <root>/<split>/<house_id>/hdf5_sensors.hdf5)")
        self.env_args = {"env_name": f"spoc/{self.root.name}", "type": "spoc",
                         "env_kwargs": {"split": split, "cameras": self.cameras}}
        index = self.root / f"house_id_to_sub_house_id_{split}.json"
        if index.exists():
            try:
                houses = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ToolkitError(f"{index} is not valid JSON ({e})") from None
            if not isinstance(houses, dict) or not all(isinstance(v, list) for v in houses.values()):
                raise ToolkitError(f"{index}: expected {{house_id: [episode, ...]}}")
            self._names = [f"{h}/{e}" for h in sorted(houses, key=_natural_key)
                           for e in sorted(map(str, houses[h]), key=_natural_key)]
        else:  # no index: every sensor file's groups
            self._names = []
            for house in sorted((d for d in split_dir.iterdir() if d.is_dir()), key=lambda d: _natural_key(d.name)):
                sensors = house / "hdf5_sensors.hdf5"
                if sensors.exists():
                    with self._open(sensors, f"house {house.name}") as f:
                        self._names += [f"{house.name}/{e}" for e in sorted(f.keys(), key=_natural_key)]

    @staticmethod
    def _open(path: Path, what: str) -> h5py.File:
        """Open a sensor file; ``what`` (``episode <name>`` or ``house <id>``) goes into the error message."""
        if not path.exists():
            raise ToolkitError(f"{path} does not exist (sensors of {what})")
        try:
            return h5py.File(path, "r")
        except OSError as e:
            raise ToolkitError(f"{path} ({what}) is not a readable HDF5 file ({e})") from None

    def episode_names(self) -> list[str]:
        return list(self._names)

    def read_episode(self, name: str) -> Episode:
        house, sep, episode = name.partition("/")
        if not sep:
            raise ToolkitError(f"SPOC episode name {name!r}: expected <house_id>/<episode>")
        house_dir = self.root / self.split / house
        sensors_path = house_dir / "hdf5_sensors.hdf5"
        where = f"{sensors_path}: episode {name}"
        with self._open(sensors_path, f"episode {name}") as f:
            if episode not in f:
                groups = ", ".join(sorted(f.keys(), key=_natural_key)[:8])
                raise ToolkitError(f"{where} is not in the file (groups: {groups})")
            try:
                sensors, attrs = self._read_sensors(f[episode], where)
            except (OSError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise ToolkitError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
        actions, state = sensors
        n = len(actions)
        obs: dict[str, np.ndarray] = {}
        for camera in self.cameras:
            video = house_dir / f"raw_{camera}_camera__{episode}.mp4"
            obs[f"rgb_{camera}"] = self._frames(video, n + 1, where)
        obs["state"] = state
        dones = np.zeros(n, np.uint8)
        if n:
            dones[-1] = 1
        result = Episode(obs=obs, actions=actions, rewards=np.zeros(n, np.float32), dones=dones,
                         attrs={**attrs, "house_id": house, "episode": episode, "source": "spoc"})
        result.check(where)
        return result

    def _frames(self, video: Path, rows: int, where: str) -> np.ndarray:
        from toolkit.datamodules.video import Decoder

        try:
            decoder = Decoder(video, self.video_backend)
            if decoder.num_frames != rows:
                raise ToolkitError(f"video {video} has {decoder.num_frames} frames but the sensors have {rows} rows")
            frames = decoder.frames(np.arange(rows - 1))
            decoder.close()
        except ToolkitError as e:
            raise ToolkitError(f"{where}: {e}") from None
        except Exception as e:  # each decoder backend has its own error types
            raise ToolkitError(f"{where}: video {video} cannot be decoded ({type(e).__name__}: {e})") from None
        return frames

    def _read_sensors(self, g: h5py.Group, where: str) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        for key in ("last_action_str", "last_agent_location", "templated_task_spec"):
            if key not in g:
                raise ToolkitError(f"{where} has no sensor '{key}' (has: {', '.join(sorted(g.keys()))})")
        action_strs = decode_strings(g["last_action_str"][()])
        rows = len(action_strs)
        if rows < 2:
            raise ToolkitError(f"{where}: last_action_str has {rows} rows; an episode needs at least 2")
        location = np.asarray(g["last_agent_location"][()], dtype=np.float64)
        lengths = {"last_agent_location": len(location), "templated_task_spec": g["templated_task_spec"].shape[0]}
        in_hand = None
        if "an_object_is_in_hand" in g:
            value = np.asarray(g["an_object_is_in_hand"][()], dtype=np.float32)
            in_hand = value.reshape(len(value), -1)[:, 0]
            lengths["an_object_is_in_hand"] = len(in_hand)
        bad = {k: v for k, v in lengths.items() if v != rows}
        if bad:
            raise ToolkitError(f"{where}: sensors of mismatched lengths: last_action_str has {rows} rows, "
                               + ", ".join(f"{k} {v}" for k, v in bad.items()))
        if location.ndim != 2 or location.shape[1] < 6:
            raise ToolkitError(f"{where}: last_agent_location is {list(location.shape)}, expected [T, 6]")
        in_hand = np.zeros(rows, np.float32) if in_hand is None else in_hand

        indices = []
        for t, a in enumerate(action_strs[1:], start=1):
            if a not in ACTION_INDEX:
                raise ToolkitError(f"{where}: unknown action {a!r} at row {t} of last_action_str "
                                   f"(SPOC's actions: {', '.join(ACTIONS)})")
            indices.append(ACTION_INDEX[a])
        actions = np.asarray(indices, np.float32).reshape(-1, 1)
        n = rows - 1

        parts = []
        for key in self.state_keys:
            if key in _LOCATION:
                parts.append(location[:n, _LOCATION[key]].reshape(n, 1))
            elif key == "in_hand":
                parts.append(in_hand[:n].reshape(n, 1))
            elif key in g and isinstance(g[key], h5py.Dataset) and g[key].dtype.kind in "biuf":
                value = np.asarray(g[key][()])
                if len(value) != rows:
                    raise ToolkitError(f"{where}: sensor {key} has {len(value)} rows, last_action_str {rows}")
                parts.append(value[:n].reshape(n, -1))
            else:
                raise ToolkitError(f"{where}: state key {key!r} is neither one of {', '.join([*_LOCATION, 'in_hand'])} "
                                   f"nor a numeric sensor of the episode (has: {', '.join(sorted(g.keys()))})")
        state = np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((n, 0), np.float32)

        spec_text = decode_strings(g["templated_task_spec"][:1])[0]
        try:
            spec = json.loads(spec_text)
        except json.JSONDecodeError as e:
            raise ToolkitError(f"{where}: templated_task_spec is not JSON ({e}): {spec_text[:80]!r}") from None
        attrs: dict[str, Any] = {"task_spec": spec_text, "task_type": str(spec.get("task_type", ""))}
        instruction = None
        if "task_natural_language_spec" in g:
            instruction = decode_strings(g["task_natural_language_spec"][:1])[0] or None
        instruction = instruction or spec.get("natural_language_spec") or instruction_from_spec(spec)
        if instruction:
            attrs["instruction"] = str(instruction)
        if "hypothetical_task_success" in g:
            attrs["success"] = bool(np.asarray(g["hypothetical_task_success"][()]).reshape(-1)[-1])
        return (actions, state), attrs
