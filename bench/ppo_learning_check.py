"""Does the toolkit's PPO learn as Stable-Baselines3's does? Both from scratch on the same BabyAI level (symbolic
state, the MLPs and settings of bench/ppo_speed.py, envs in process), the success of the last 100 training
episodes at 6 points of the run, per seed.

    python bench/ppo_learning_check.py BabyAI-GoToRedBallGrey-v0 60000
"""
import sys, time, argparse, numpy as np, torch, logging
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppo_speed
ppo_speed.LEVEL = sys.argv[1]
STEPS = int(sys.argv[2])

def ours(seed):
    from toolkit.datamodules.online import OnlineDataModule
    a = argparse.Namespace(envs=4, n_steps=128, n_epochs=4, batch_size=64, hidden=128)
    dm = OnlineDataModule(ppo_speed.ENV_CFG, num_envs=4, seed=500_000, batch_size=64, history=1, env_processes=False)
    pol = ppo_speed.toolkit_ppo(a, dm, seed)
    opt = pol.configure_optimizers()
    curve = []
    while dm.stepper.env_steps < STEPS:
        for batch in pol.online_batches(dm.stepper):
            loss = pol.compute_loss(batch)["loss"]; opt.zero_grad(); loss.backward()
            torch.nn.utils.clip_grad_norm_(pol.parameters(), 0.5); opt.step()
        curve.append((dm.stepper.env_steps, dm.stepper.episode_stats().get("success", 0)))
    return curve

def sb3(seed):
    from stable_baselines3 import PPO as S
    from stable_baselines3.common.vec_env import DummyVecEnv
    from stable_baselines3.common.callbacks import BaseCallback
    from collections import deque
    recent, curve = deque(maxlen=100), []
    class CB(BaseCallback):
        def _on_step(self):
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if done: recent.append(float(info.get("success", False)))
            return True
        def _on_rollout_end(self):
            curve.append((self.model.num_timesteps, np.mean(recent) if recent else 0))
    envs = DummyVecEnv([ppo_speed.make_sb3_env] * 4)
    m = S("MlpPolicy", envs, learning_rate=3e-4, n_steps=128, batch_size=64, n_epochs=4, gamma=0.99, gae_lambda=0.95,
          clip_range=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5, device="cpu", seed=seed, verbose=0,
          policy_kwargs={"net_arch": {"pi": [128], "vf": [128]}, "activation_fn": torch.nn.GELU})
    m.learn(STEPS, callback=CB())
    return curve

if __name__ == "__main__":
    torch.set_num_threads(1)
    for name, fn in (("toolkit", ours), ("sb3", sb3)):
        for seed in (0, 1):
            t = time.time(); c = fn(seed)
            pts = [c[int(i)] for i in np.linspace(0, len(c) - 1, 6)]
            print(name, seed, " ".join(f"{s}:{v:.2f}" for s, v in pts), f"({time.time() - t:.0f}s)", flush=True)
