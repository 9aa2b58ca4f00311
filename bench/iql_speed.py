"""IQL update speed on CPU, on features (the encoder out of the picture): updates/s at batch 256, two hidden
layers of 256, state dims 39 (Meta-World's state) and 512 (a pooled image feature), Gaussian actor.

    python bench/iql_speed.py [--threads 2] [--updates 300] [--no-compile]

Rows, all on the same random transitions, each update = sample a batch + one IQL update:
  * CORL-style: a faithful re-implementation of CORL's single-file IQL update (separate V, twin-Q and
    actor optimizers, three backward passes, two Q MLPs, parameter-by-parameter Polyak update), as the
    reference the toolkit is measured against;
  * toolkit, eager: ``IQLPolicy`` (``policy.trunk=concat``, ``history=1``): one backward pass, twin Q as
    one batched network, foreach Polyak update; with plain ``torch.optim.Adam`` and with ``fused=True``
    (the default config);
  * toolkit, bf16: the same under CPU autocast to bfloat16 (``trainer.precision=bf16-mixed`` in train.py);
  * toolkit, compiled: the same with ``torch.compile`` on the loss;
  * toolkit, Lightning: the real ``train.py`` path, ``Trainer.fit`` with logging, fused Adam, fp32 and
    bf16-mixed.
Prints a table and writes it to bench/results/iql_speed.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

ACTION_DIM, BATCH, HIDDEN, DATASET = 4, 256, 256, 100_000


# --- CORL-style reference (structure of CORL's algorithms/offline/iql.py) --------------------------------
def corl_mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 2):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1]))


class CorlIQL:
    def __init__(self, state_dim: int, tau: float = 0.005, beta: float = 3.0, expectile: float = 0.7) -> None:
        self.q1 = corl_mlp([state_dim + ACTION_DIM, HIDDEN, HIDDEN, 1])
        self.q2 = corl_mlp([state_dim + ACTION_DIM, HIDDEN, HIDDEN, 1])
        self.q1_target, self.q2_target = copy.deepcopy(self.q1).requires_grad_(False), copy.deepcopy(self.q2).requires_grad_(False)
        self.vf = corl_mlp([state_dim, HIDDEN, HIDDEN, 1])
        self.actor = corl_mlp([state_dim, HIDDEN, HIDDEN, ACTION_DIM])
        self.log_std = nn.Parameter(torch.zeros(ACTION_DIM))
        self.v_opt = torch.optim.Adam(self.vf.parameters(), lr=3e-4)
        self.q_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=3e-4)
        self.actor_opt = torch.optim.Adam([*self.actor.parameters(), self.log_std], lr=3e-4)
        self.actor_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, 1_000_000)
        self.tau, self.beta, self.expectile = tau, beta, expectile

    def update(self, s, a, r, s2, d) -> dict[str, float]:
        with torch.no_grad():
            next_v = self.vf(s2).squeeze(-1)
        # value
        with torch.no_grad():
            sa = torch.cat([s, a], 1)
            target_q = torch.min(self.q1_target(sa), self.q2_target(sa)).squeeze(-1)
        v = self.vf(s).squeeze(-1)
        adv = target_q - v
        v_loss = torch.mean(torch.abs(self.expectile - (adv < 0).float()) * adv ** 2)
        self.v_opt.zero_grad()
        v_loss.backward()
        self.v_opt.step()
        # twin Q
        targets = r + (1.0 - d) * 0.99 * next_v.detach()
        qs = [self.q1(sa).squeeze(-1), self.q2(sa).squeeze(-1)]
        q_loss = sum(nn.functional.mse_loss(q, targets) for q in qs) / len(qs)
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()
        for target, source in ((self.q1_target, self.q1), (self.q2_target, self.q2)):
            for tp, sp in zip(target.parameters(), source.parameters()):
                tp.data.copy_((1 - self.tau) * tp.data + self.tau * sp.data)
        # actor
        exp_adv = torch.exp(self.beta * adv.detach()).clamp(max=100.0)
        std = self.log_std.clamp(-20.0, 2.0).exp()
        dist = torch.distributions.MultivariateNormal(self.actor(s), scale_tril=torch.diag(std))
        policy_loss = torch.mean(exp_adv * -dist.log_prob(a))
        self.actor_opt.zero_grad()
        policy_loss.backward()
        self.actor_opt.step()
        self.actor_sched.step()
        return {"value_loss": v_loss.item(), "q_loss": q_loss.item(), "actor_loss": policy_loss.item()}


# --- the toolkit's IQL ------------------------------------------------------------------------------------
def toolkit_iql(state_dim: int, fused: bool):
    from toolkit.encoders.impala import ImpalaEncoder
    from toolkit.policies.iql import IQLPolicy

    stats = {"obs/state": {"mean": [0.0] * state_dim, "std": [1.0] * state_dim},
             "actions": {"mean": [0.0] * ACTION_DIM, "std": [1.0] * ACTION_DIM,
                         "min": [-1.0] * ACTION_DIM, "max": [1.0] * ACTION_DIM}}
    shape_meta = {"rgb_keys": [], "state_dim": state_dim, "action_dim": ACTION_DIM}
    encoder = ImpalaEncoder(channels=(4,), num_blocks=1, out_dim=8, freeze=True)  # unused: no cameras
    return IQLPolicy(encoder, shape_meta, stats, optimizer=partial(torch.optim.Adam, fused=fused),
                     history=1, horizon=1, trunk="concat", hidden_dim=HIDDEN, actor_head="gaussian",
                     actor_cosine_steps=1_000_000, augment_shift=0)


class Transitions:
    """Random transitions held as tensors; ``sample`` draws a batch as CORL's replay buffer does."""

    def __init__(self, state_dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.s = torch.randn(DATASET, state_dim, generator=g)
        self.s2 = torch.randn(DATASET, state_dim, generator=g)
        self.a = torch.rand(DATASET, ACTION_DIM, generator=g) * 2 - 1
        self.r = torch.rand(DATASET, generator=g)
        self.d = (torch.rand(DATASET, generator=g) < 0.01).float()

    def sample(self) -> tuple[torch.Tensor, ...]:
        i = torch.randint(0, DATASET, (BATCH,))
        return self.s[i], self.a[i], self.r[i], self.s2[i], self.d[i]

    def window_batch(self) -> dict:
        """The same sample as a toolkit window batch (history 1, horizon 1)."""
        s, a, r, s2, d = self.sample()
        no_pad = torch.zeros(BATCH, 1, dtype=torch.bool)
        return {"obs": {"state": s[:, None]}, "obs_is_pad": no_pad, "next_obs": {"state": s2[:, None]},
                "next_obs_is_pad": no_pad, "action": a[:, None], "action_is_pad": no_pad, "reward": r, "done": d}


def timed(update, updates: int, warmup: int = 30) -> float:
    for _ in range(warmup):
        update()
    start = time.perf_counter()
    for _ in range(updates):
        update()
    return updates / (time.perf_counter() - start)


def toolkit_update(policy, data: Transitions, loss_fn=None):
    conf = policy.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    loss_fn = loss_fn or policy.compute_loss

    def update() -> None:
        out = loss_fn(data.window_batch())
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        policy.update_targets()
    return update


def bf16(loss_fn):
    def loss(batch: dict) -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(batch)
    return loss


def lightning_updates_per_s(state_dim: int, data: Transitions, updates: int, precision: str = "32-true") -> float:
    import lightning as L

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield data.window_batch()

    policy = toolkit_iql(state_dim, fused=True)
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 30:
                self.start = time.perf_counter()

    clock = Clock()
    trainer = L.Trainer(max_steps=30 + updates, callbacks=[clock], logger=L.pytorch.loggers.CSVLogger("/tmp/iql_speed_logs"),
                        log_every_n_steps=50, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, precision=precision)
    trainer.fit(policy, train_dataloaders=loader)
    return updates / (time.perf_counter() - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows: dict[str, dict[int, float]] = {}
    for dim in (39, 512):
        data = Transitions(dim)
        corl = CorlIQL(dim)
        rows.setdefault("CORL-style (3 optimizers, 3 backward passes)", {})[dim] = timed(
            lambda: corl.update(*data.sample()), args.updates)
        rows.setdefault("toolkit, eager, Adam", {})[dim] = timed(
            toolkit_update(toolkit_iql(dim, fused=False), data), args.updates)
        rows.setdefault("toolkit, eager, fused Adam (default)", {})[dim] = timed(
            toolkit_update(toolkit_iql(dim, fused=True), data), args.updates)
        policy = toolkit_iql(dim, fused=True)
        rows.setdefault("toolkit, eager, fused Adam, bf16 autocast", {})[dim] = timed(
            toolkit_update(policy, data, bf16(policy.compute_loss)), args.updates)
        if not args.no_compile:
            policy = toolkit_iql(dim, fused=True)
            rows.setdefault("toolkit, torch.compile, fused Adam", {})[dim] = timed(
                toolkit_update(policy, data, torch.compile(policy.compute_loss)), args.updates, warmup=50)
        rows.setdefault("toolkit, Lightning Trainer.fit, fused Adam", {})[dim] = lightning_updates_per_s(
            dim, data, args.updates)
        rows.setdefault("toolkit, Lightning Trainer.fit, fused Adam, bf16-mixed", {})[dim] = lightning_updates_per_s(
            dim, data, args.updates, "bf16-mixed")
        print({k: round(v[dim], 1) for k, v in rows.items()}, flush=True)

    base = rows["CORL-style (3 optimizers, 3 backward passes)"]
    lines = [f"| IQL update (batch {BATCH}, 2 x {HIDDEN} hidden, {args.threads} threads) | updates/s, state 39 | "
             f"vs CORL | updates/s, state 512 | vs CORL |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r[39]:.0f} | {r[39] / base[39]:.1f}x | {r[512]:.0f} | {r[512] / base[512]:.1f}x |")
    table = "\n".join(lines)
    print(table)
    out = Path(__file__).resolve().parent / "results" / "iql_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
