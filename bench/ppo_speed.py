"""Env steps/s of the toolkit's whole PPO loop (acting, env stepping, GAE, updates) beside Stable-Baselines3's PPO, on
the same env with the same number of envs, rollout length, epochs, minibatch size and MLP; then the per-step acting
time of a frozen DINOv2 ViT-S policy with and without the rollout feature cache.

    python bench/ppo_speed.py [--envs 4] [--n-steps 128] [--cycles 6] [--threads 1] [--no-dinov2]

The env: BabyAI GoToLocal (minigrid) with no camera: ``state`` is minigrid's 7x7x3 egocentric symbolic view,
flattened, and the agent's direction (151 floats), 7 discrete actions, 64 steps per episode. No rendering, so the
loop itself is what is measured. The toolkit runs it as a toolkit env (``SymbolicGoToLocal``, ``_target_`` of the
online datamodule, one AsyncVectorEnv subprocess per env); SB3 as a plain gymnasium env (its SubprocVecEnv, one
subprocess per env, forkserver as ours; DummyVecEnv too, in process).

The networks: ours is ``policy=ppo`` with ``policy.trunk=concat``, ``history=1`` (the state is the trunk's output)
and no separate critic: an actor head Linear(151, 128)-GELU-Linear(128, 7) and a value head
Linear(151, 128)-GELU-Linear(128, 1). SB3: ``net_arch=dict(pi=[128], vf=[128])`` with GELU: the same two MLPs.
Both: n_epochs=4, batch_size=64, gamma 0.99, lambda 0.95, clip 0.2, ent_coef 0.01, grad-norm clip 0.5, lr 3e-4.

Threads: 1 by default, for both. On a busy 2-core machine two torch threads make every small GELU/tanh call wait for
a second thread (~15 ms a call here instead of 0.01 ms), which swamps both loops.

Rates are steady state: time between the starts of consecutive update cycles (collection + updates), after the first
cycle, so process start-up and env start-up are out of it. SB3 is optional: ``make compare-venv`` installs it in
.venv-compare (run the bench with ``.venv-compare/bin/python``), or ``pip install stable-baselines3`` (the bench says
so when it is missing). Prints a markdown table and writes bench/results/ppo_speed.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # env workers import this module by name (_target_)

from toolkit.envs.base import RobotEnv  # noqa: E402

LEVEL, EPISODE_STEPS = "BabyAI-GoToLocal-v0", 64
ENV_CFG = {"_target_": "ppo_speed.SymbolicGoToLocal"}


class SymbolicGoToLocal(RobotEnv):
    """BabyAI GoToLocal without a camera: ``state`` = the flattened 7x7x3 symbolic view and a one-hot direction."""

    def __init__(self, max_episode_steps: int = EPISODE_STEPS) -> None:
        import minigrid  # noqa: F401  (registers BabyAI-*)

        super().__init__(max_episode_steps, terminate_on_success=True)
        self._env = gym.make(LEVEL, max_steps=max_episode_steps).unwrapped
        self.action_space = gym.spaces.Discrete(int(self._env.action_space.n))
        self.observation_space = gym.spaces.Dict({"state": gym.spaces.Box(0.0, 10.0, (7 * 7 * 3 + 4,), np.float32)})

    def _obs(self, raw: dict[str, Any]) -> dict[str, Any]:
        state = np.zeros(7 * 7 * 3 + 4, np.float32)
        state[:147] = raw["image"].reshape(-1)
        state[147 + int(raw["direction"])] = 1.0
        return {"state": state}

    def _reset(self, seed: int | None) -> dict[str, Any]:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # level generation prints "Sampling rejected" lines
            raw, _ = self._env.reset(seed=seed)
        return self._obs(raw)

    def _step(self, action: np.ndarray):
        raw, reward, terminated, _, _ = self._env.step(int(np.asarray(action).reshape(-1)[0]))
        success = bool(terminated and reward > 0)
        return self._obs(raw), float(reward), success, {}


class StateOnly(gym.ObservationWrapper):
    """The same env for SB3's MlpPolicy: the ``state`` vector as a Box observation."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = env.observation_space["state"]

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        return observation["state"]


def make_sb3_env() -> gym.Env:
    return StateOnly(SymbolicGoToLocal())


# --- the toolkit --------------------------------------------------------------------------------------------------
def toolkit_ppo(args, datamodule, seed: int = 0):
    import torch

    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.policies.ppo import PPO

    torch.manual_seed(seed)
    # state only: the encoder is never called (no camera); it is built because every policy owns one
    encoder = ImpalaEncoder(image_size=8, channels=(1,), num_blocks=1, out_dim=1)
    optimizer = partial(torch.optim.AdamW, weight_decay=1e-4, fused=True)  # as conf/policy/bc_transformer.yaml
    return PPO(encoder, datamodule.shape_meta, datamodule.stats, optimizer=optimizer,
               lr=3e-4, history=1, horizon=1, trunk="concat", d_model=args.hidden, action_type="discrete",
               num_actions=7, n_steps=args.n_steps, n_epochs=args.n_epochs, batch_size=args.batch_size, gamma=0.99,
               gae_lambda=0.95, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, separate_critic=False)


def params_of(module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_toolkit(args, lightning: bool = True, processes: bool = True) -> dict[str, Any]:
    """``lightning``: the train.py path (Trainer.fit with the OnlineDataModule, CSV logging every 10 steps, gradient
    clipping); else the same module's ``online_batches`` with a plain optimizer loop (what Lightning adds).
    ``processes``: one simulator process per env (the default, ``data.env_processes=true``) or all in this one."""
    import lightning as L
    import torch

    from toolkit.datamodules.online import OnlineDataModule

    datamodule = OnlineDataModule(ENV_CFG, num_envs=args.envs, seed=500_000, batch_size=args.batch_size, history=1,
                                  env_processes=processes)
    policy = toolkit_ppo(args, datamodule)
    updates_per_cycle = args.n_epochs * (args.n_steps * args.envs // args.batch_size)
    marks: list[tuple[float, int]] = []

    def mark() -> None:
        steps = datamodule.stepper.env_steps
        if not marks or marks[-1][1] != steps:
            marks.append((time.perf_counter(), steps))

    if lightning:
        class Marks(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                mark()  # right after a cycle's collection (minibatches are made when trained on)

        with_dir = Path(args.out_dir) / "toolkit_logs"
        trainer = L.Trainer(max_steps=args.cycles * updates_per_cycle, accelerator="cpu", devices=1,
                            logger=L.pytorch.loggers.CSVLogger(with_dir), log_every_n_steps=getattr(args, "log_every", 10),
                            gradient_clip_val=0.5, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            callbacks=[Marks()])
        trainer.fit(policy, datamodule)
    else:
        optimizer = policy.configure_optimizers()
        try:
            for _ in range(args.cycles):
                for batch in policy.online_batches(datamodule.stepper):
                    mark()
                    loss = policy.compute_loss(batch)["loss"]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
                    optimizer.step()
        finally:
            datamodule.stepper.close()
    used = params_of(policy.head) + params_of(policy.value_head)
    return {"rate": steady_rate(marks), "params": used, "env_steps": marks[-1][1]}


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Env steps per second between the first and the last cycle start (the first cycle's start-up left out)."""
    (t0, s0), (t1, s1) = marks[0], marks[-1]
    return (s1 - s0) / (t1 - t0)


# --- Stable-Baselines3 --------------------------------------------------------------------------------------------
def run_sb3(args, subprocesses: bool) -> dict[str, Any] | None:
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        return None
    import torch
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    marks: list[tuple[float, int]] = []

    class Marks(BaseCallback):
        def _on_rollout_start(self) -> None:
            marks.append((time.perf_counter(), self.model.num_timesteps))

        def _on_step(self) -> bool:
            return True

    fns = [make_sb3_env for _ in range(args.envs)]
    envs = SubprocVecEnv(fns, start_method="forkserver") if subprocesses else DummyVecEnv(fns)
    model = SB3PPO("MlpPolicy", envs, learning_rate=3e-4, n_steps=args.n_steps, batch_size=args.batch_size,
                   n_epochs=args.n_epochs, gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=0.5,
                   max_grad_norm=0.5, device="cpu", seed=0, verbose=0,
                   policy_kwargs={"net_arch": {"pi": [args.hidden], "vf": [args.hidden]},
                                  "activation_fn": torch.nn.GELU})
    try:
        model.learn(total_timesteps=args.cycles * args.n_steps * args.envs + 1, callback=Marks())
    finally:
        envs.close()
    marks.append((time.perf_counter(), model.num_timesteps))  # the end of the last cycle (its updates included)
    return {"rate": steady_rate(marks[:-1]) if len(marks) > 2 else float("nan"), "params": params_of(model.policy),
            "env_steps": model.num_timesteps}


# --- where the time goes: the loop's parts, each timed alone ------------------------------------------------------
def components(args) -> list[tuple[str, float, float]]:
    """Milliseconds of each part of one env step of all envs (and of one minibatch update), toolkit and SB3, envs in
    process: stepping the envs with random actions (resets included; the same simulator for both), acting (the
    policy's forward, sampling, what the rollout buffer needs), and one update (loss, backward, clip, step)."""
    import torch
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from toolkit.datamodules.online import OnlineDataModule
    from toolkit.envs.stepper import EnvStepper

    def per_call(fn, n: int) -> float:
        for _ in range(max(1, n // 10)):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    g = np.random.default_rng(0)
    stepper = EnvStepper(ENV_CFG, args.envs, seed=0, processes=False)
    env_ms = per_call(lambda: stepper.step(lambda obs, fresh: g.integers(0, 7, (args.envs, 1))), 1000)
    obs = stepper.observation()
    stepper.close()
    datamodule = OnlineDataModule(ENV_CFG, num_envs=args.envs, seed=0, batch_size=args.batch_size, history=1,
                                  env_processes=False)
    policy = toolkit_ppo(args, datamodule).eval()
    fresh = np.zeros(args.envs, bool)
    act_ms = per_call(lambda: policy._sample(obs, fresh, {}), 1000)
    batch = {"obs": {"state": torch.as_tensor(g.random((args.batch_size, 1, obs["state"].shape[-1])), dtype=torch.float32)},
             "action": torch.as_tensor(g.integers(0, 7, args.batch_size)), "logprob": torch.full((args.batch_size,), -1.9),
             "value": torch.zeros(args.batch_size), "advantage": torch.as_tensor(g.normal(size=args.batch_size), dtype=torch.float32),
             "ret": torch.as_tensor(g.normal(size=args.batch_size), dtype=torch.float32)}
    optimizer = policy.configure_optimizers()
    policy.train()

    def update() -> None:
        loss = policy.compute_loss(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
        optimizer.step()

    update_ms = per_call(update, 300)

    envs = DummyVecEnv([make_sb3_env for _ in range(args.envs)])
    model = SB3PPO("MlpPolicy", envs, n_steps=args.n_steps, batch_size=args.batch_size, n_epochs=args.n_epochs,
                   device="cpu", seed=0, verbose=0, max_grad_norm=0.5, ent_coef=0.01,
                   policy_kwargs={"net_arch": {"pi": [args.hidden], "vf": [args.hidden]}, "activation_fn": torch.nn.GELU})
    state = obs["state"]

    def sb3_act() -> None:  # what SB3's collect_rollouts does per step around env.step
        with torch.no_grad():
            actions, values, log_probs = model.policy(torch.as_tensor(state))
        actions.cpu().numpy()

    sb3_act_ms = per_call(sb3_act, 1000)
    model.learn(total_timesteps=args.n_steps * args.envs)  # one cycle: a full rollout buffer to train on
    updates = args.n_epochs * (args.n_steps * args.envs // args.batch_size)
    sb3_update_ms = per_call(model.train, 3) / updates
    envs.close()
    return [("stepping the envs (random actions, resets included)", env_ms, env_ms),
            ("acting (forward, sample, rollout-buffer values)", act_ms, sb3_act_ms),
            ("one minibatch update", update_ms, sb3_update_ms)]


# --- simulation on the second core: would overlapping it with acting pay? -------------------------------------------
def _worker(conn, num_envs: int) -> None:
    """A process holding ``num_envs`` envs (one round trip per step for all of them)."""
    from toolkit.envs.vector import make_vector_env

    envs = make_vector_env(ENV_CFG, num_envs, processes=False)
    while True:
        cmd, data = conn.recv()
        if cmd == "close":
            break
        conn.send(envs.reset(seed=data[0], options=data[1]) if cmd == "reset" else envs.step(data))


def simulation_overlap(args) -> list[tuple[str, float]]:
    """Env steps/s of the bare acting + stepping loop (the speed bench's MLP acting, no updates, no bookkeeping), with
    the simulation (a) in this process, (b) half the envs in one worker process stepped while this process steps the
    other half, (c) two groups of envs in processes (gymnasium AsyncVectorEnv), this process acting for one group while
    the other steps (Sample Factory's double-buffered sampling). The upper bound of what moving the simulator to the
    second core can give the PPO loop."""
    import multiprocessing as mp

    import torch

    from toolkit.envs.vector import make_vector_env

    e, n = args.envs, args.n_steps * 4
    net = torch.nn.Sequential(torch.nn.Linear(151, args.hidden), torch.nn.GELU(), torch.nn.Linear(args.hidden, 7))

    @torch.no_grad()
    def act(state: np.ndarray) -> np.ndarray:
        return torch.distributions.Categorical(logits=net(torch.as_tensor(state))).sample().numpy()

    def reset_ended(envs, obs, ended):
        if ended.any():
            obs, _ = envs.reset(seed=[None] * len(ended), options={"reset_mask": ended})
        return obs

    def in_process() -> float:
        envs = make_vector_env(ENV_CFG, e, processes=False)
        obs, _ = envs.reset(seed=list(range(e)))
        t0 = time.perf_counter()
        for _ in range(n):
            obs, _, term, trunc, _ = envs.step(act(obs["state"]))
            obs = reset_ended(envs, obs, term | trunc)
        rate = n * e / (time.perf_counter() - t0)
        envs.close()
        return rate

    def half_in_a_worker() -> float:
        k = e // 2
        context = mp.get_context("forkserver")
        parent, child = context.Pipe()
        worker = context.Process(target=_worker, args=(child, k), daemon=True)
        worker.start()
        local = make_vector_env(ENV_CFG, e - k, processes=False)
        local_obs, _ = local.reset(seed=list(range(e - k)))
        parent.send(("reset", (list(range(k)), None)))
        remote_obs, _ = parent.recv()
        t0 = time.perf_counter()
        for _ in range(n):
            action = act(np.concatenate([local_obs["state"], remote_obs["state"]]))
            parent.send(("step", action[e - k:]))  # the worker steps its envs while this process steps its own
            local_obs, _, term, trunc, _ = local.step(action[:e - k])
            local_obs = reset_ended(local, local_obs, term | trunc)
            remote_obs, _, term, trunc, _ = parent.recv()
            if (term | trunc).any():
                parent.send(("reset", ([None] * k, {"reset_mask": term | trunc})))
                remote_obs, _ = parent.recv()
        rate = n * e / (time.perf_counter() - t0)
        parent.send(("close", None))
        worker.join()
        local.close()
        return rate

    def two_pipelined_groups() -> float:
        groups = [make_vector_env(ENV_CFG, e // 2, processes=True) for _ in range(2)]
        obs = [g.reset(seed=list(range(e // 2)))[0] for g in groups]
        t0 = time.perf_counter()
        for g, envs in enumerate(groups):
            envs.step_async(act(obs[g]["state"]))
        for _ in range(n):
            for g, envs in enumerate(groups):  # act for this group while the other group's envs step
                o, _, term, trunc, _ = envs.step_wait()
                obs[g] = reset_ended(envs, o, term | trunc)
                envs.step_async(act(obs[g]["state"]))
        for envs in groups:
            envs.step_wait()
        rate = n * e / (time.perf_counter() - t0)
        for envs in groups:
            envs.close()
        return rate

    setups = [("in this process", in_process), (f"{e // 2} envs in a worker process, stepped while this process "
                                                f"steps the other {e - e // 2}", half_in_a_worker),
              (f"two groups of {e // 2} env processes (AsyncVectorEnv), acting for one while the other steps",
               two_pipelined_groups)]
    rates: dict[str, list[float]] = {name: [] for name, _ in setups}
    for _ in range(args.rounds):
        for name, fn in setups:
            rates[name].append(fn())
    return [(name, float(np.median(r))) for name, r in rates.items()]


# --- DINOv2 acting, with and without the feature cache ------------------------------------------------------------
def dinov2_acting(args) -> list[tuple[str, float, int]]:
    import torch

    from toolkit.encoders.dinov2 import DINOv2Encoder
    from toolkit.policies.ppo import PPO

    torch.manual_seed(0)
    size, envs, history = args.dinov2_size, args.dinov2_envs, args.dinov2_history
    encoder = DINOv2Encoder(variant="vits14", weights=None, freeze=True, image_size=size)
    shape_meta = {"rgb_keys": ["rgb"], "image_shape": {"rgb": [size, size, 3]}, "state_dim": 4, "action_dim": 4}
    stats = {"obs/state": {"mean": [0.0] * 4, "std": [1.0] * 4},
             "actions": {"mean": [0.0] * 4, "std": [1.0] * 4, "min": [-1.0] * 4, "max": [1.0] * 4}}
    policy = PPO(encoder, shape_meta, stats, optimizer=partial(torch.optim.AdamW), history=history,
                 separate_critic=True, freeze_encoder=True).eval()
    g = np.random.default_rng(0)
    obs = [{"rgb": g.integers(0, 256, (envs, size, size, 3), dtype=np.uint8), "state": g.normal(size=(envs, 4))}
           for _ in range(args.dinov2_steps + 1)]
    rows = []
    trunk_s = 0.0
    for cached in (True, False):
        type(policy).caches_features = (lambda self: True) if cached else (lambda self: False)
        policy.reset()
        fresh, step = np.ones(envs, bool), {}
        policy._sample(obs[0], fresh, step)  # warm-up, and the histories filled
        t0 = time.perf_counter()
        for o in obs[1:]:
            policy._sample(o, np.zeros(envs, bool), {})
        per_step = (time.perf_counter() - t0) / args.dinov2_steps
        if cached:  # what a key/value cache of the trunk could shorten: the trunks + heads over the cached window
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(args.dinov2_steps):
                    policy.distribution_and_value(step["obs"])
            trunk_s = (time.perf_counter() - t0) / args.dinov2_steps
        frames = envs if cached else envs * history
        rows.append((f"DINOv2 ViT-S/14 frozen ({size} px), T={history}, {envs} envs: "
                     f"{'feature cache (1 frame per env per step)' if cached else f're-encoding the window ({history} frames per env per step)'}",
                     per_step, frames))
    del type(policy).caches_features  # back to the class's own
    rows.append((f"of which the trunks and heads over the T={history} window of cached features (actor + critic)",
                 trunk_s, 0))
    return rows


CONFIGS = {
    "toolkit": ("toolkit PPO, train.py path (Lightning Trainer + OnlineDataModule), AsyncVectorEnv (a process per env)",
                lambda a: run_toolkit(a, lightning=True, processes=True)),
    "sb3": ("Stable-Baselines3 2.9.2 PPO, SubprocVecEnv (a process per env)", lambda a: run_sb3(a, subprocesses=True)),
    "toolkit-inproc": ("toolkit PPO, train.py path, envs in process (`data.env_processes=false`)",
                       lambda a: run_toolkit(a, lightning=True, processes=False)),
    "sb3-dummy": ("Stable-Baselines3 2.9.2 PPO, DummyVecEnv (envs in process)", lambda a: run_sb3(a, subprocesses=False)),
    "toolkit-plain": ("toolkit PPO, `online_batches` + a plain optimizer loop (no Lightning), envs in process",
                      lambda a: run_toolkit(a, lightning=False, processes=False)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=4)
    parser.add_argument("--n-steps", type=int, default=128)
    parser.add_argument("--n-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--cycles", type=int, default=5, help="update cycles per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every setup, interleaved; the median is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, for both")
    parser.add_argument("--only", choices=[*CONFIGS, "components", "overlap", "dinov2"], nargs="*")
    parser.add_argument("--no-dinov2", action="store_true")
    parser.add_argument("--dinov2-size", type=int, default=224)
    parser.add_argument("--dinov2-envs", type=int, default=2)
    parser.add_argument("--dinov2-history", type=int, default=4)
    parser.add_argument("--dinov2-steps", type=int, default=4)
    parser.add_argument("--out-dir", default="/tmp/ppo_speed")
    args = parser.parse_args()

    import logging

    import torch

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    only = list(args.only or [*CONFIGS, "components", "overlap", "dinov2"])
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIGS if k in only}
    notes = []
    for r in range(args.rounds):
        for key in list(runs):
            result = CONFIGS[key][1](args)
            if result is None:  # SB3 missing
                del runs[key]
                notes.append("Stable-Baselines3 is not installed: run the bench with .venv-compare/bin/python "
                             "(make compare-venv) or `pip install stable-baselines3==2.9.2` for its rows")
                continue
            runs[key].append(result)
            print(f"round {r + 1}: {key}: {result['rate']:.0f} env steps/s", flush=True)
    setup = (f"{args.envs} envs x {args.n_steps} steps per cycle, {args.n_epochs} epochs of minibatch {args.batch_size}, "
             f"MLP {args.hidden} hidden (actor + critic), {args.threads} torch thread(s), median of {args.rounds} "
             f"interleaved runs (all runs in brackets)")
    lines = [f"PPO loop on {LEVEL} (symbolic state, no rendering): {setup}", "",
             "| setup | env steps/s | params |", "|---|---:|---:|"]
    for key, results in runs.items():
        rates = sorted(x["rate"] for x in results)
        lines.append(f"| {CONFIGS[key][0]} | {float(np.median(rates)):.0f} ({', '.join(f'{x:.0f}' for x in rates)}) "
                     f"| {results[0]['params']:,} |")
    median = {k: float(np.median([x["rate"] for x in v])) for k, v in runs.items()}
    for ours, theirs, what in (("toolkit", "sb3", "a process per env"), ("toolkit-inproc", "sb3-dummy", "envs in process")):
        if ours in median and theirs in median:
            lines.append(f"\ntoolkit / SB3, {what}: {median[ours] / median[theirs]:.2f}x")
    ours = {k: v for k, v in median.items() if k.startswith("toolkit") and k != "toolkit-plain"}
    theirs = {k: v for k, v in median.items() if k.startswith("sb3")}
    if ours and theirs:
        best, their_best = max(ours, key=ours.get), max(theirs, key=theirs.get)
        lines.append(f"\nfastest toolkit setup ({best}) / fastest SB3 setup ({their_best}): "
                     f"{ours[best] / theirs[their_best]:.2f}x")
    if "components" in only and importlib.util.find_spec("stable_baselines3") is not None:
        parts = components(args)
        updates_per_step = args.n_epochs * args.envs / args.batch_size  # minibatch updates per env step of all envs
        lines += ["", f"Where the time goes (ms, envs in process, each part timed alone; {updates_per_step:g} updates "
                  f"per step of all {args.envs} envs):", "", "| part | toolkit | SB3 |", "|---|---:|---:|"]
        lines += [f"| {name} | {toolkit_ms:.3f} | {sb3_ms:.3f} |" for name, toolkit_ms, sb3_ms in parts]
        (_, env_ms, _), (_, act, sb3_act), (_, upd, sb3_upd) = parts
        ours_ms, theirs_ms = env_ms + act + updates_per_step * upd, env_ms + sb3_act + updates_per_step * sb3_upd
        lines.append(f"| sum per step of all envs (-> env steps/s) | {ours_ms:.3f} ({1e3 * args.envs / ours_ms:.0f}) | "
                     f"{theirs_ms:.3f} ({1e3 * args.envs / theirs_ms:.0f}) |")
        lines.append(f"\nWith acting and updates free, the simulator alone allows {1e3 * args.envs / env_ms:.0f} env steps/s; "
                     f"1.5x SB3's sum would need the toolkit's acting + updates within "
                     f"{theirs_ms / 1.5 - env_ms:.3f} ms per step of all envs (they take {ours_ms - env_ms:.3f}).")
    if "overlap" in only:
        lines += ["", f"The simulator on the second core? Acting + stepping alone ({args.envs} envs, the MLP's acting, no "
                  f"updates or bookkeeping), median of {args.rounds}:", "", "| simulation | env steps/s |", "|---|---:|"]
        lines += [f"| {name} | {rate:.0f} |" for name, rate in simulation_overlap(args)]
    if "dinov2" in only and not args.no_dinov2:
        lines += ["", "| acting (PPO `_sample`, one step of every env) | ms per step | frames encoded per step |",
                  "|---|---:|---:|"]
        lines += [f"| {name} | {t * 1e3:.0f} | {frames} |" for name, t, frames in dinov2_acting(args)]
    text = "\n".join(lines + ([""] + sorted(set(notes)) if notes else []))
    print(text)
    out = Path(__file__).resolve().parent / "results" / "ppo_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
