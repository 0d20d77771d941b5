"""The step loop every stage shares: batches in, metrics and checkpoints out, stops handled.

`run_loop` is a thin shell around a compiled `train_step`. It asks `host_batch(step)` for step n's batch
(a pure function of the step, so resume needs no iterator state), dispatches step n+1 before it reads
step n's metrics, stops on a NaN/Inf loss before any checkpoint of that state is written, evaluates every
`eval_every` steps, checkpoints every `checkpoint_every` steps, at the end, on SIGTERM/SIGINT and when the
wall-clock budget `max_duration_s` (counted across resumes) runs out.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from typing import Any, Callable

import jax

from jaxllm import hardware, loss as loss_lib


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the message says why and what survives."""


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then it checkpoints and exits)."""

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def evaluate(eval_step, params, batches) -> dict[str, float]:
    """Loss, perplexity and accuracy over `batches`, from the summed LossSums of `eval_step`."""
    sums = None
    for batch in batches:
        out = eval_step(params, batch)
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    return loss_lib.summarize(jax.device_get(sums))


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    stop_reason: str | None  # "received SIGTERM", "wall-clock budget ... reached", or None: all steps done
    train: dict[str, Any]  # the last train row written
    val: dict[str, Any]  # the last val row written

    @property
    def interrupted(self) -> bool:
        """Stopped by a signal: the run is not finished, and the same command resumes it."""
        return bool(self.stop_reason and self.stop_reason.startswith("received"))


def run_loop(state, *, train_cfg, train_step: Callable, host_batch: Callable[[int], dict], shard: Callable,
             evaluate_params: Callable[[Any], dict[str, float]], save: Callable[[int, Any, int, float], None],
             writer, last_good_step: Callable[[], int | None], elapsed_before: float = 0.0,
             tokens_seen: int = 0, flops_per_token: float = 0.0, peak_flops: float = 0.0,
             nan_hint: str = "lower optim.lr or set optim.grad_clip") -> LoopResult:
    """Run steps from `state.step` to `train_cfg.steps`; see the module docstring.

    `save(step, state, tokens_seen, elapsed_s)` writes a checkpoint; `shard(batch)` puts a host batch on
    the mesh; `evaluate_params(params)` returns the validation row's scalars.
    """
    t = train_cfg
    step_number = int(jax.device_get(state.step))
    run_start = time.monotonic()
    progress = _progress_bar(t, step_number)
    last_train: dict[str, Any] = {}
    last_val: dict[str, Any] = {}
    stop_reason = None
    interval = {"start": None, "tokens": 0}
    pending = None  # (step number after the update, device metrics, tokens in the batch) of the step in flight

    def settle(item) -> None:
        """Read one finished step's metrics: the NaN guard, then logging."""
        nonlocal last_train, tokens_seen
        done_step, metrics, n_tokens = item
        metrics = jax.device_get(metrics)
        if not math.isfinite(float(metrics["loss"])):
            good = last_good_step()
            raise TrainingError(f"the loss became {float(metrics['loss'])} at step {done_step}; stopped without "
                                f"checkpointing this state (last good checkpoint: "
                                f"{'step ' + str(good) if good is not None else 'none'}); {nan_hint}")
        tokens_seen += n_tokens
        if interval["start"] is None:  # the first step includes compilation: time from its end
            interval["start"], interval["tokens"] = time.monotonic(), 0
        else:
            interval["tokens"] += n_tokens
        if done_step % t.log_every == 0 or done_step == t.steps:
            now = time.monotonic()
            rate = interval["tokens"] / (now - interval["start"]) if interval["tokens"] else float("nan")
            interval["start"], interval["tokens"] = now, 0
            # Every scalar the step returns is logged (MoE adds its aux losses and loads, for instance).
            last_train = writer.write(done_step, "train", {
                **metrics, "tokens_per_s": rate, "mfu": hardware.mfu(rate, flops_per_token, peak_flops),
                "tokens_seen": tokens_seen})
            progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['lr']):.2e}",
                                 tok_s=f"{rate:.0f}", refresh=False)
        progress.update(1)

    try:
        with StopRequest() as stop:
            while step_number < t.steps:
                host = host_batch(step_number)
                state, metrics = train_step(state, shard(host))
                step_number += 1
                if pending is not None:
                    settle(pending)
                pending = (step_number, metrics, int(host["inputs"].size))
                due_eval = step_number % t.eval_every == 0 or step_number == t.steps
                due_save = step_number % t.checkpoint_every == 0 or step_number == t.steps
                elapsed = elapsed_before + time.monotonic() - run_start
                if stop.signal_name:
                    stop_reason = f"received {stop.signal_name}"
                elif t.max_duration_s and elapsed >= t.max_duration_s:
                    stop_reason = f"wall-clock budget of {t.max_duration_s:.0f} s reached"
                if due_eval or due_save or stop_reason:  # never checkpoint or evaluate an unchecked state
                    settle(pending)
                    pending = None
                if due_eval:
                    last_val = writer.write(step_number, "val", evaluate_params(state.params))
                if due_save or stop_reason:
                    save(step_number, state, tokens_seen, elapsed_before + time.monotonic() - run_start)
                if stop_reason:
                    break
            if pending is not None:
                settle(pending)
    finally:
        progress.close()
    return LoopResult(state=state, step=step_number, stop_reason=stop_reason, train=last_train, val=last_val)


def _progress_bar(train_cfg, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(total=train_cfg.steps, initial=start_step, disable=not train_cfg.progress, unit="step",
                dynamic_ncols=True, file=sys.stderr)
