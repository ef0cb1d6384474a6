"""Demo: a Flax NNX training loop with non-blocking saves, a simulated crash and a resume.

Run ``python -m datarax_ckpt.demo`` (or ``datarax-ckpt demo``). It trains a small MLP on
synthetic data on the CPU, saves every ``--save-every`` steps with ``keep=3`` and
metadata, prints each save's blocking time next to the training step time, then throws
the model away, restores the latest checkpoint into a fresh model, optimizer and data
iterator with a fresh handler, and checks that training continues with exactly the same
losses as the uninterrupted run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from datarax_ckpt import OrbaxCheckpointHandler


class MLP(nnx.Module):
    """A two-layer perceptron, wide enough that a save moves a few MiB."""

    def __init__(self, width: int, rngs: nnx.Rngs):
        self.inp = nnx.Linear(16, width, rngs=rngs)
        self.hidden = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.hidden(nnx.gelu(self.inp(x)))))


class BatchIterator:
    """A synthetic data pipeline whose position is part of the checkpoint (Checkpointable)."""

    def __init__(self, seed: int, batch_size: int = 256):
        self.key = jax.random.key(seed)
        self.position = 0
        self.batch_size = batch_size

    def __next__(self):
        kx, kn = jax.random.split(jax.random.fold_in(self.key, self.position))
        x = jax.random.normal(kx, (self.batch_size, 16))
        y = jnp.sin(x.sum(axis=1, keepdims=True)) + 0.1 * jax.random.normal(
            kn, (self.batch_size, 1)
        )
        self.position += 1
        return x, y

    def get_state(self):
        return {"key": self.key, "position": self.position}

    def set_state(self, state):
        self.key, self.position = state["key"], state["position"]


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def fresh(width: int, seed: int):
    model = MLP(width, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return model, optimizer, BatchIterator(seed)


def train(handler, directory, state, first, last, save_every, keep, log):
    model, optimizer, data = state["model"], state["optimizer"], state["data"]
    losses = {}
    for step in range(first, last + 1):
        t0 = time.perf_counter()
        loss = float(train_step(model, optimizer, *next(data)))
        step_ms = (time.perf_counter() - t0) * 1e3
        losses[step] = loss
        if handler is not None and step % save_every == 0:
            t0 = time.perf_counter()
            handler.save(directory, state, step=step, keep=keep, metadata={"loss": loss})
            save_ms = (time.perf_counter() - t0) * 1e3
            log(
                f"step {step:4d}  loss {loss:.5f}  "
                f"step {step_ms:7.2f} ms  save blocked {save_ms:7.2f} ms"
            )
    return losses


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns 0 when the resumed run matches the uninterrupted one."""
    parser = argparse.ArgumentParser(prog="python -m datarax_ckpt.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="total training steps")
    parser.add_argument("--crash-at", type=int, default=130, help="step after which we 'crash'")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024, help="hidden width (state size)")
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.dir and any(pathlib.Path(args.dir).glob("ckpt-*")):
        print(
            f"error: --dir {args.dir} already holds checkpoints (from an earlier demo run?); "
            f"pass a new folder, or delete this one first (rm -r {args.dir}).",
            file=sys.stderr,
        )
        return 2
    directory = args.dir or tempfile.mkdtemp(prefix="datarax-ckpt-demo-")
    log = print

    nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(fresh(args.width, 0)[0])))
    log(f"datarax_ckpt demo: MLP with {nbytes / 2**20:.1f} MiB of parameters (x3 with Adam),")
    log(f"saving every {args.save_every} steps to {directory} with keep={args.keep}")
    log("(the first save of a process also compiles the capture function)\n")

    # The uninterrupted reference run, without checkpoints.
    model, optimizer, data = fresh(args.width, 0)
    state = {"model": model, "optimizer": optimizer, "data": data, "run": "demo"}
    reference = train(None, directory, state, 1, args.steps, args.save_every, args.keep, log)

    # The run that saves, then "crashes" after --crash-at.
    model, optimizer, data = fresh(args.width, 0)
    state = {"model": model, "optimizer": optimizer, "data": data, "run": "demo"}
    with OrbaxCheckpointHandler() as handler:
        train(handler, directory, state, 1, args.crash_at, args.save_every, args.keep, log)
    del model, optimizer, data, state
    log(f"\n-- simulated crash after step {args.crash_at}; restarting from disk --\n")

    with OrbaxCheckpointHandler() as handler:
        steps = handler.get_checkpoint_steps(directory)
        latest = steps[-1]
        model, optimizer, data = fresh(args.width, 123)  # different init: restore must win
        state = {"model": model, "optimizer": optimizer, "data": data, "run": ""}
        state = handler.restore(directory, state)
        meta = handler.restore(directory, metadata_only=True)
        log(f"steps on disk: {steps}; restored step {latest} (loss {meta['loss']:.5f}),")
        log(f"data position {data.position}, run name {state['run']!r}\n")
        resumed = train(
            handler, directory, state, latest + 1, args.steps, args.save_every, args.keep, log
        )

    same = all(resumed[s] == reference[s] for s in resumed)
    log(f"\nresumed losses identical to the uninterrupted run: {same}")
    size = sum(f.stat().st_size for f in pathlib.Path(directory).rglob("*") if f.is_file())
    log(f"\nThe checkpoints ({size / 2**20:.1f} MiB) stay in {directory}")
    log(f"Look at them: datarax-ckpt ls {directory}; datarax-ckpt show {directory}")
    log(f"Remove them:  rm -r {directory}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
