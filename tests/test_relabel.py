"""Sub-skill segments on BabyAI, SPRINT relabeling (primitive, aggregate, chain), language conditioning end to
end, and the zero-shot evaluation command."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, run_train
from gdict import GDict
from toolkit.collect import collect
from toolkit.datamodules.episode_datamodule import EpisodeDataModule
from toolkit.datamodules.episode_file import EpisodeWriter, episode_names
from toolkit.datamodules.relabel import JoinInstructions, Span, chain_spans, episode_spans
from toolkit.envs.babyai import BabyAIEnv, _leaves
from toolkit.errors import ToolkitError
from toolkit.zero_shot import categorize

SEQ_ENV = {"_target_": "toolkit.envs.babyai.BabyAIEnv", "level": "GoToSeqS5R2", "image_size": 16}


@pytest.fixture(scope="module")
def seq_file(tmp_path_factory):
    """12 bot episodes of GoToSeqS5R2 (missions of 1 to 4 "go to" clauses joined by and / then / after you)."""
    path = tmp_path_factory.mktemp("babyai") / "seq.hdf5"
    collect(SEQ_ENV, path, num_episodes=12, num_envs=1, seed=0, progress=False)
    return path


def test_segments_end_where_the_levels_verifier_completes_each_clause(seq_file):
    env = BabyAIEnv(level="GoToSeqS5R2", image_size=16)
    composite = 0
    with h5py.File(seq_file) as f:
        for name in episode_names(f):
            g = f["data"][name]
            segments, actions = json.loads(g.attrs["segments"]), g["actions"][()]
            clauses = json.loads(g.attrs["sub_instructions"])
            composite += len(clauses) > 1
            # consecutive, covering the whole (successful) episode
            assert segments[0]["start"] == 0 and segments[-1]["end"] == len(actions) - 1
            assert all(b["start"] == a["end"] + 1 for a, b in zip(segments, segments[1:]))
            # replay the episode: each segment ends at the step where the verifier marks its clause(s) done
            env.reset(seed=int(g.attrs["seed"]))
            assert env.sub_instructions() == clauses and env.instruction() == g.attrs["instruction"]
            leaves = _leaves(env._env.instrs)
            ends, done_before = {}, [False] * len(leaves)
            for t, a in enumerate(actions):
                _, _, terminated, _, info = env.step(a)
                for i, (_, flag) in enumerate(leaves):
                    done = (terminated and info["success"]) if flag is None else flag()
                    if done and not done_before[i]:
                        ends.setdefault(t, []).append(env.sub_instructions()[i])
                    done_before[i] = done
            assert [s["end"] for s in segments] == sorted(ends)
            assert [s["instruction"] for s in segments] == [" and ".join(ends[t]) for t in sorted(ends)]
    assert composite >= 3  # the fixture has missions of several clauses


@pytest.fixture()
def hand_file(tmp_path):
    """One 6-step episode, mission "a, then b, then c", clauses done at steps 1, 4 and 5; and one without segments."""
    path = tmp_path / "hand.hdf5"
    writer = EpisodeWriter(path, {"env_name": "hand", "type": "test", "env_kwargs": {}})
    for n, attrs in ((6, {"instruction": "a, then b, then c", "segments": json.dumps(
            [{"start": 0, "end": 1, "instruction": "a"}, {"start": 2, "end": 4, "instruction": "b"},
             {"start": 5, "end": 5, "instruction": "c"}])}), (3, {"instruction": "d"})):
        writer.append(GDict({"obs": {"state": np.arange(n, dtype=np.float32)[:, None]},
                             "actions": np.arange(n, dtype=np.float32)[:, None] + 100,
                             "rewards": np.zeros(n, np.float32), "dones": (np.arange(n) == n - 1).astype(np.uint8)}),
                      {"success": True, **attrs})
    return path


def test_relabeling_makes_the_expected_samples_of_a_hand_checked_episode(hand_file):
    segments = [{"start": 0, "end": 1, "instruction": "a"}, {"start": 2, "end": 4, "instruction": "b"},
                {"start": 5, "end": 5, "instruction": "c"}]
    spans = episode_spans(0, 6, "a, then b, then c", segments, ["primitive", "aggregate"])
    assert [(s.start, s.stop, s.instruction, s.relabeled) for s in spans] == [
        (0, 6, "a, then b, then c", False),          # the episode as recorded
        (0, 2, "a", True), (2, 5, "b", True), (5, 6, "c", True),  # primitive skills
        (0, 5, "a, then b", True), (2, 6, "b, then c", True),     # aggregates (a, b, c = the original)
    ]
    assert episode_spans(0, 6, "m", segments, ["primitive"], keep_original=False)[0] == Span(0, 0, 2, "a", True)
    with pytest.raises(ToolkitError, match=r"data.relabel=\['prim'\]: unknown mode"):
        EpisodeDataModule(str(hand_file), relabel=["prim"])

    dm = EpisodeDataModule(str(hand_file), history=2, horizon=2, relabel=["primitive", "aggregate"])
    dm.transitions = True
    dm.setup("fit")
    ds = dm.train_set  # demo_0; demo_1 is a validation episode (1, 11, 21, ...)
    by_instruction = {}
    for i in range(len(ds)):
        item = ds[i]
        text = ds.instructions[ds.spans[ds.span_of[i], 3]]
        by_instruction.setdefault(text, []).append(item)
    b = by_instruction["b"]  # steps 2, 3, 4: windows padded at the span's start, reward/done at its end
    assert [x["obs"]["state"][:, 0].tolist() for x in b] == [[2, 2], [2, 3], [3, 4]]
    assert [x["obs_is_pad"].tolist() for x in b] == [[True, False], [False, False], [False, False]]
    assert [x["action"][:, 0].tolist() for x in b] == [[102, 103], [103, 104], [104, 104]]
    assert [x["action_is_pad"].tolist() for x in b] == [[False, False], [False, False], [False, True]]
    assert [x["reward"].item() for x in b] == [0, 0, 1] and [x["done"].item() for x in b] == [0, 0, 1]
    assert b[-1]["next_obs"]["state"][:, 0].tolist() == [3, 4]  # never the next segment's step
    assert len(by_instruction["a, then b"]) == 5 and len(by_instruction["c"]) == 1
    assert [x["reward"].item() for x in by_instruction["a, then b, then c"]] == [0] * 6  # recorded rewards kept
    valid = dm.valid_set  # an episode without segments keeps its original span only
    assert len(valid) == 3 and valid.instructions == ["d"]


def test_chains_join_segments_of_other_episodes_whose_start_matches():
    segs = [(0, {"start": 0, "end": 2, "instruction": "a"}), (0, {"start": 3, "end": 5, "instruction": "b"}),
            (1, {"start": 0, "end": 4, "instruction": "c"}), (2, {"start": 0, "end": 1, "instruction": "d"})]
    first = np.array([[0.0], [1.0], [1.0], [2.0]])
    end = np.array([[1.0], [2.0], [0.0], [1.0]])
    spans = chain_spans(segs, first, end, np.random.default_rng(0), per_segment=3, tolerance=0.0)
    pairs = {(s.instruction, s.bootstrap) for s in spans}
    # a ends in state 1: b starts there too but is in the same episode, c is in another -> only a+c;
    # b ends in 2: d; c ends in 0: a; d ends in 1: b and c
    assert pairs == {("a, then c", "c"), ("b, then d", "d"), ("c, then a", "a"), ("d, then b", "b"), ("d, then c", "c")}
    for s in spans:  # each chain keeps the first segment's own steps
        ep, seg = next((e, g) for e, g in segs if g["instruction"] == s.instruction.split(", then ")[0])
        assert (s.episode, s.start, s.stop, s.relabeled) == (ep, seg["start"], seg["end"] + 1, True)
    anything = chain_spans(segs, first, end, np.random.default_rng(0), per_segment=1, tolerance=None)
    episode_of = {g["instruction"]: e for e, g in segs}
    assert len(anything) == 4 and all(s.episode != episode_of[s.bootstrap] for s in anything)


def test_chained_windows_bootstrap_only_their_last_step(seq_file):
    from toolkit.encoders.language import MiniLMEncoder

    dm = EpisodeDataModule(str(seq_file), history=2, horizon=1, relabel=["primitive", "chain"], chain_tolerance=None)
    dm.transitions, dm.language = True, MiniLMEncoder()
    dm.setup("fit")
    ds = dm.train_set
    chained = np.flatnonzero(ds.spans[ds.span_of, 5] >= 0)
    assert len(chained) > 0
    batch = ds[chained.tolist()]
    last = ds.t_of[chained] == ds.spans[ds.span_of[chained], 2] - 1
    assert batch["bootstrap"].numpy().tolist() == last.tolist()
    assert (batch["done"].numpy() == last).all()
    boot = ds.lang[ds.spans[ds.span_of[chained], 5]]
    np.testing.assert_allclose(batch["bootstrap_lang"].numpy(), boot)
    assert not np.allclose(batch["lang"].numpy(), boot)  # conditioned on the joined instruction, not the second
    with pytest.raises(ToolkitError, match="offline RL"):
        bc = EpisodeDataModule(str(seq_file), relabel=["chain"])
        bc.setup("fit")


def test_iql_reward_of_a_chain_end_is_the_value_of_the_second_instruction():
    from test_iql import make_batch, make_policy

    policy = make_policy(lang_dim=5)
    batch = {**make_batch(), "lang": torch.randn(8, 5), "bootstrap_lang": torch.randn(8, 5)}
    batch["bootstrap"] = torch.arange(8) < 4
    with torch.no_grad():  # the critic's TD target, by hand: r = V(s', second instruction) on chain ends
        v_next = policy.value(policy.features(batch["next_obs"], batch["lang"]))[:, 0]
        v_chain = policy.value(policy.features(batch["next_obs"], batch["bootstrap_lang"]))[:, 0]
        reward = torch.where(batch["bootstrap"], v_chain, batch["reward"])
        td = reward + policy.gamma * (1 - batch["done"]) * v_next
        q1, q2 = policy.q_values(policy.features(batch["obs"], batch["lang"]),
                                 policy.action_norm.normalize(batch["action"][:, 0]))
        expected = torch.nn.functional.mse_loss(q1, td) + torch.nn.functional.mse_loss(q2, td)
        got = policy.compute_loss(batch)["q_loss"]
        unchained = policy.compute_loss({**batch, "bootstrap": torch.zeros(8, dtype=torch.bool)})["q_loss"]
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, unchained)


def test_zero_shot_categories():
    trained = {"missions": ["go to a, then go to b"], "clauses": ["go to a", "go to b"], "max_clauses": 2}
    assert categorize("go to a, then go to b", ["go to a", "go to b"], trained) == "seen"
    assert categorize("go to b and go to a", ["go to b", "go to a"], trained) == "unseen combination"
    assert categorize("go to a", ["go to a"], trained) == "unseen combination"
    assert categorize("go to a, then go to b and go to a", ["go to a", "go to b", "go to a"], trained) == "longer chain"
    assert categorize("go to c", ["go to c"], trained) is None


@pytest.mark.parametrize("policy", ["bc_transformer", "iql", "dagger"])
def test_each_policy_trains_on_babyai_with_instructions_and_rolls_out(tmp_path, policy):
    extra = {"bc_transformer": ["data.relabel=[primitive,aggregate]"],
             "iql": ["data.relabel=[primitive,aggregate,chain]", "data.chain_tolerance=null"],
             "dagger": ["callbacks.dagger.steps_per_iteration=2", "callbacks.dagger.iterations=1",
                        "callbacks.dagger.episodes_per_iteration=2", "callbacks.dagger.num_envs=1"]}[policy]
    run_train("env=babyai", "env.level=GoToSeqS5R2", "env.image_size=16", f"policy={policy}", "data.num_demos=4",
              "env.max_episode_steps=null", "collect.only_success=true", *extra, root=tmp_path)
    ckpt = next(tmp_path.glob("logs/debug/runs/*/checkpoints/last.ckpt"))
    from toolkit.policies.base import load_policy

    loaded = load_policy(ckpt)
    assert loaded.language_conditioned and loaded.discrete and loaded.hparams["lang_dim"] == 384
    assert loaded.trained_instructions["max_clauses"] >= 1
    with pytest.raises(ToolkitError, match="env.symbolic"):  # env=babyai observes the symbolic view by default
        loaded.act({**{k: v[None] for k, v in BabyAIEnv(level="GoToSeqS5R2", image_size=16).reset(seed=5)[0].items()},
                    "instruction": ["go to the red ball"]})
    env = BabyAIEnv(level="GoToSeqS5R2", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=5)
    loaded.reset()
    action = loaded.act({**{k: v[None] for k, v in obs.items()}, "instruction": [env.instruction()]})
    assert action.shape == (1, 1) and 0 <= action[0, 0] < 7
    summary = json.loads(next(tmp_path.glob("logs/debug/runs/*/summary.json")).read_text())
    assert "rollout/success_rate" in summary
    if policy == "dagger":  # the labelled episodes keep their mission and segments
        with h5py.File(next(tmp_path.glob("data/*.hdf5"))) as f:
            last = f["data"][episode_names(f)[-1]]
            assert "instruction" in last.attrs and "segments" in last.attrs and last.attrs["source"].startswith("dagger")


def test_a_policy_trained_on_word_positions_reloads_with_them(tmp_path):
    """``language=babyai_words``: the checkpoint names the encoder, so a loaded policy embeds rollout missions the
    way it trained (64 positions x 31 words), not with the default MiniLM."""
    from toolkit.encoders.language import WordPositionEncoder
    from toolkit.policies.base import load_policy

    run_train("env=babyai", "env.level=GoToLocal", "env.image_size=16", "data.num_demos=4", "language=babyai_words",
              "data.obs_keys=[state]", "state_encoder=babyai_film", "policy.state_encoder.channels=8", root=tmp_path)
    loaded = load_policy(next(tmp_path.glob("logs/debug/runs/*/checkpoints/last.ckpt")))
    assert isinstance(loaded.language, WordPositionEncoder) and loaded.hparams["lang_dim"] == 64 * 31
    env = BabyAIEnv(level="GoToLocal", image_size=16, symbolic=True)
    obs, _ = env.reset(seed=5)
    loaded.reset()
    assert 0 <= loaded.act({**{k: v[None] for k, v in obs.items()}, "instruction": [env.instruction()]})[0, 0] < 7


def test_zero_shot_command_reports_each_category(tmp_path):
    run_train("env=babyai", "env.level=GoToSeqS5R2", "env.image_size=16", "data.num_demos=6",
              "env.max_episode_steps=null", "collect.only_success=true", "data.max_sub_instructions=1", root=tmp_path)
    ckpt = next(tmp_path.glob("logs/debug/runs/*/checkpoints/last.ckpt"))
    trained = torch.load(ckpt, weights_only=True)["trained_instructions"]
    assert trained["max_clauses"] == 1  # longer missions were held out of training
    # Six demos see few clauses; declare every clause of the first missions drawn as seen (the missions and the
    # longest chain stay the trained ones), so that each category turns up among a few hundred draws.
    env = BabyAIEnv(level="GoToSeqS5R2", image_size=16)
    clauses = set()
    for seed in range(3_000_000, 3_000_200):
        env.reset(seed=seed)
        clauses.update(env.sub_instructions())
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["trained_instructions"]["clauses"] = sorted(clauses | set(trained["clauses"]))
    torch.save(checkpoint, ckpt)
    out = tmp_path / "zs.json"
    proc = subprocess.run([sys.executable, "-m", "toolkit.zero_shot", str(ckpt), "--episodes", "2", "--max-draws", "200",
                           "--num-envs", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {"unseen combination", "longer chain"} <= {r["category"] for r in rows}
    assert all(r["clauses"] > 1 for r in rows if r["category"] == "longer chain")
    assert all(r["clauses"] == 1 for r in rows if r["category"] != "longer chain")
    assert all(0.0 <= r["success_rate"] <= 1.0 and 1 <= r["episodes"] <= 2 for r in rows)
    assert "zero-shot success" in proc.stdout
