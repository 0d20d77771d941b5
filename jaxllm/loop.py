"""The step loop every stage shares: batches in, metrics and checkpoints out, stops handled.

`run_loop` is a thin shell around a compiled `train_step`. It asks `host_batch(step)` for step n's batch
(a pure function of the step, so resume needs no iterator state), dispatches step n+1 before it reads
step n's metrics, stops on a NaN/Inf loss before any checkpoint of that state is written, evaluates every
`eval_every` steps, checkpoints every `checkpoint_every` steps, at the end, on SIGTERM/SIGINT and when the
wall-clock budget `max_duration_s` (counted across resumes) runs out. A background thread prepares the next
`train.prefetch` batches (host batch + device_put) while the step runs.

A run stopped by its budget is finished, like one that did all its steps: its last checkpoint records the
stop (`stopped` in its metadata) and the time used, so running it again does no step and writes nothing
(a larger `max_duration_s`, or none, trains on). An evaluation that raises first checkpoints the state it
was given, so no step is lost to it.

With a budget, the loop times `FIT_PROBE_STEPS` steps after the first (compiling) one. If the schedule's steps
will not fit, it prints a warning naming the steps that do. With `train.fit_steps_to_budget` it instead fixes
the step count that fits (see `steps_that_fit`), asks the stage to rebuild the train step for a schedule of
that length (`refit`), and passes it to every later checkpoint's metadata (`fitted_steps`) so that a resume
keeps it. The probe's steps used the first schedule's values: in its first few steps a one-cycle or
warm-up schedule differs from the fitted one by less than the warm-up's slope over those steps (the lr is
still near its initial value there), so the effect on training is negligible.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxllm import hardware, loss as loss_lib


clock = time.monotonic  # every time the loop reads; tests replace it with a fake clock

FIT_PROBE_STEPS = 5  # steps timed after the compiling one, for the budget warning and fit_steps_to_budget
FIT_MARGIN = 0.02  # share of the budget the fit holds back for what it does not measure (logging, jitter)


def steps_that_fit(budget_s: float, elapsed_s: float, step_number: int, step_s: float, *, eval_s: float = 0.0,
                   eval_every: int = 1, save_s: float = 0.0, checkpoint_every: int = 1,
                   reserve_s: float = 0.0, margin: float = FIT_MARGIN) -> int:
    """The step a run now at `step_number`, `elapsed_s` into `budget_s`, can reach before the budget ends.

    Each further step costs `step_s`, plus one `eval_s` every `eval_every` steps and one `save_s` every
    `checkpoint_every`; `reserve_s` (a recompile, the final full evaluation) and `margin` of the budget
    are held back.
    """
    left_s = budget_s * (1.0 - margin) - elapsed_s - reserve_s
    per_step_s = step_s + eval_s / eval_every + save_s / checkpoint_every
    return step_number + max(0, int(left_s // per_step_s))


class Prefetcher:
    """`make(n)` for n = start, start + 1, ... < stop, computed `depth` ahead by a background thread.

    `get(n)` returns exactly what `make(n)` returns (batch n is a pure function of n, so the order of
    computation cannot change it); an exception raised by `make` is raised again by `get`. `close` stops
    the thread; with depth 0 there is no thread and `get(n)` calls `make(n)`.
    """

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int):
        self._make, self._depth = make, depth
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stopping = threading.Event()
        self._thread = None
        if depth > 0 and start < stop:
            self._thread = threading.Thread(target=self._run, args=(start, stop), name="jaxllm-prefetch", daemon=True)
            self._thread.start()

    def _run(self, start: int, stop: int) -> None:
        for n in range(start, stop):
            try:
                item = (n, self._make(n), None)
            except BaseException as error:  # handed to the loop's thread, which raises it
                item = (n, None, error)
            while not self._stopping.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if self._stopping.is_set() or item[2] is not None:
                return

    def get(self, n: int):
        if self._thread is None:
            return self._make(n)
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        if got != n:
            raise RuntimeError(f"the prefetcher produced batch {got} where batch {n} was asked for")
        return value

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()


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
    if sums is None:
        raise ValueError("evaluate() was given no validation batches")
    return loss_lib.summarize(jax.device_get(sums))


def real_tokens(batch: dict) -> int:
    """The input tokens of a host batch that are not padding: in each row, the positions up to its last
    target with weight > 0. Padding only ever follows an example (pretraining rows have none; a fine-tune
    row ends with its answer, which carries the loss), so this counts prompt and answer tokens, not pads.
    `tokens_per_s`, `tokens_seen` and MFU count these."""
    carries_loss = np.asarray(batch["weights"]) > 0
    last = carries_loss.shape[-1] - np.argmax(carries_loss[..., ::-1], axis=-1)  # 1 + the last weighted position
    return int(np.where(carries_loss.any(axis=-1), last, 0).sum())


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    stop_reason: str | None  # "received SIGTERM", "wall-clock budget ... reached", or None: all steps done
    train: dict[str, Any]  # the last train row written
    val: dict[str, Any]  # the last val row written
    trained: bool = True  # False: the run was finished before this call (all steps done, or budget used up)

    @property
    def interrupted(self) -> bool:
        """Stopped by a signal: the run is not finished, and the same command resumes it."""
        return bool(self.stop_reason and self.stop_reason.startswith("received"))


def run_loop(state, *, train_cfg, train_step: Callable, host_batch: Callable[[int], dict], shard: Callable,
             evaluate_params: Callable[[Any], dict[str, float]], save: Callable[[int, Any, dict], None],
             writer, last_good_step: Callable[[], int | None], elapsed_before: float = 0.0,
             tokens_seen: int = 0, flops_per_token: float = 0.0, peak_flops: float = 0.0,
             nan_hint: str = "lower optim.lr or set optim.grad_clip", fitted_steps: int | None = None,
             refit: Callable[[int], Callable] | None = None, final_eval_scale: float = 0.0,
             token_share: float = 1.0) -> LoopResult:
    """Run steps from `state.step` to `train_cfg.steps` (or `fitted_steps`); see the module docstring.

    `save(step, state, meta)` writes a checkpoint whose metadata includes `meta` (tokens_seen, elapsed_s,
    and fitted_steps once fixed); `shard(batch)` puts a host batch on the mesh; `evaluate_params(params)`
    returns the validation row's scalars. With train.fit_steps_to_budget and no `fitted_steps` yet,
    `refit(steps)` must return the train step rebuilt for a schedule of `steps` steps (and record the value
    in the workdir's config); `final_eval_scale` is the cost of the stage's final evaluation in periodic
    evaluations (0 = none), held back from the budget. `token_share`: the share of each batch's rows that
    `host_batch` builds (several processes: this process's rows; 1 = all); its real tokens are divided by it
    to count the whole batch's (exact when every row is full, as in pretraining; for padded fine-tune rows
    the other processes' padding is taken to be like this one's).
    """
    t = train_cfg
    step_number = int(jax.device_get(state.step))
    total = int(fitted_steps or t.steps)  # the step the schedule ends at, and the loop with it
    budget_reached = f"wall-clock budget of {t.max_duration_s:.0f} s reached"
    if step_number >= total or (t.max_duration_s and elapsed_before >= t.max_duration_s):
        # Finished before: no step, no checkpoint, no evaluation (a budget stop is a finish, not a pause).
        return LoopResult(state=state, step=step_number, train={}, val={}, trained=False,
                          stop_reason=budget_reached if step_number < total else None)
    fitting = bool(t.fit_steps_to_budget and not fitted_steps and t.max_duration_s)
    if fitting and refit is None:
        raise ValueError("train.fit_steps_to_budget needs run_loop(refit=...) to rebuild the train step")
    run_start = clock()
    progress = _progress_bar(total, step_number, t.progress and jax.process_index() == 0)  # process 0's only
    last_train: dict[str, Any] = {}
    last_val: dict[str, Any] = {}
    stop_reason = None
    interval = {"start": None, "tokens": 0}
    # Step timing after compilation: first settle time, steps since, last settle time, eval/save time between.
    # A budget calls for the warning, or for the fit; a resumed fitted run keeps its value without a word.
    wanted = bool(t.max_duration_s) and (fitting or not t.fit_steps_to_budget)
    probe = {"first": None, "steps": 0, "last": None, "paused": 0.0,
             "done": not wanted or step_number + 1 + FIT_PROBE_STEPS >= total}
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
        now = clock()
        if probe["first"] is None:
            probe["first"] = now
        else:
            probe["steps"] += 1
        probe["last"] = now
        if interval["start"] is None:  # the first step includes compilation: time from its end
            interval["start"], interval["tokens"] = now, 0
        else:
            interval["tokens"] += n_tokens
        if done_step % t.log_every == 0 or done_step == total:
            seconds = now - interval["start"]
            rate = interval["tokens"] / seconds if interval["tokens"] and seconds > 0 else float("nan")
            interval["start"], interval["tokens"] = now, 0
            # Every scalar the step returns is logged (MoE adds its aux losses and loads, for instance).
            last_train = writer.write(done_step, "train", {
                **metrics, "tokens_per_s": rate, "mfu": hardware.mfu(rate, flops_per_token, peak_flops),
                "tokens_seen": tokens_seen, "elapsed_s": elapsed_before + now - run_start})  # wall s, across resumes
            progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", lr=f"{float(metrics['lr']):.2e}",
                                 tok_s=f"{rate:.0f}", refresh=False)
        progress.update(1)

    def loop_meta() -> dict[str, Any]:
        meta = {"tokens_seen": tokens_seen, "elapsed_s": elapsed_before + clock() - run_start}
        if stop_reason == budget_reached:
            meta["stopped"] = stop_reason  # a budget stop is the run's end: the record survives the process
        return {**meta, "fitted_steps": total} if fitted_steps else meta

    def evaluate_or_save(params) -> dict[str, float]:
        """evaluate_params(params); if it raises, the (checked) state is checkpointed first: no step is lost."""
        try:
            return timed(evaluate_params, params)
        except BaseException:
            save(step_number, state, loop_meta())
            raise

    def timed(fn, *args):
        """fn(*args), its seconds counted out of the probe's step time."""
        began = clock()
        out = fn(*args)
        probe["paused"] += clock() - began
        return out

    def end_probe(step_s: float) -> None:
        """The budget warning, or (fit_steps_to_budget) the fitted step count and the rebuilt step."""
        nonlocal train_step, total, fitted_steps
        probe["done"] = True
        compile_s = probe["first"] - run_start  # the first step's compile, and about one step
        elapsed = elapsed_before + clock() - run_start
        if not fitting:
            fit = steps_that_fit(t.max_duration_s, elapsed, step_number, step_s)
            if fit < total:
                print(f"warning: the schedule ends at step {total} but at {step_s:.3g} s/step only about {fit} steps "
                      f"fit in train.max_duration_s={t.max_duration_s:.0f} s, so the learning rate will not finish "
                      f"decaying; set --config.train.steps={fit} (or fewer) or --config.train.fit_steps_to_budget=true",
                      file=sys.stderr)
            return
        evaluate_or_save(state.params)  # compiles the eval step (the run needs it anyway); timed below warm
        began = clock()
        evaluate_or_save(state.params)
        eval_s = clock() - began
        began = clock()
        save(step_number, state, loop_meta())  # a checkpoint of the state before any fitted-schedule step
        save_s = clock() - began
        elapsed = elapsed_before + clock() - run_start
        fit = steps_that_fit(t.max_duration_s, elapsed, step_number, step_s, eval_s=eval_s, eval_every=t.eval_every,
                             save_s=save_s, checkpoint_every=t.checkpoint_every,
                             reserve_s=compile_s + final_eval_scale * eval_s)
        total = fitted_steps = max(step_number + 1, min(int(t.steps), fit))
        print(f"fit_steps_to_budget: {step_s:.3g} s/step, {eval_s:.3g} s/evaluation, {save_s:.3g} s/checkpoint: "
              f"the schedule now ends at step {total} (train.steps={t.steps}, train.max_duration_s="
              f"{t.max_duration_s:.0f} s, {elapsed:.0f} s used)", file=sys.stderr)
        train_step = refit(total)
        progress.total = total
        progress.refresh()

    prefetcher = Prefetcher(lambda n: _device_batch(host_batch, shard, n, token_share), step_number,
                            max(int(t.steps), total), t.prefetch)
    try:
        with StopRequest() as stop:
            while step_number < total:
                n_tokens, batch = prefetcher.get(step_number)
                state, metrics = train_step(state, batch)
                step_number += 1
                if pending is not None:
                    settle(pending)
                pending = (step_number, metrics, n_tokens)
                if not probe["done"] and probe["steps"] >= FIT_PROBE_STEPS:
                    # Seconds between the settled steps, less evaluations and checkpoints in between.
                    step_s = (probe["last"] - probe["first"] - probe["paused"]) / probe["steps"]
                    settle(pending)  # never evaluate or checkpoint an unchecked state
                    pending = None
                    end_probe(step_s)
                due_eval = step_number % t.eval_every == 0 or step_number == total
                due_save = step_number % t.checkpoint_every == 0 or step_number == total
                elapsed = elapsed_before + clock() - run_start
                if stop.signal_name:
                    stop_reason = f"received {stop.signal_name}"
                elif t.max_duration_s and elapsed >= t.max_duration_s:
                    stop_reason = budget_reached
                if (due_eval or due_save or stop_reason) and pending is not None:  # never use an unchecked state
                    settle(pending)
                    pending = None
                if due_eval:
                    last_val = writer.write(step_number, "val", evaluate_or_save(state.params))
                if due_save or stop_reason:
                    timed(save, step_number, state, loop_meta())
                if stop_reason:
                    break
            if pending is not None:
                settle(pending)
    finally:
        prefetcher.close()
        progress.close()
    return LoopResult(state=state, step=step_number, stop_reason=stop_reason, train=last_train, val=last_val)


def report_end(result: LoopResult, meta: dict[str, Any], *, run: str, workdir, budget_field: str) -> None:
    """One stderr line for a run that had nothing left to train, or that its budget stopped (and is finished).

    `run` names it ("the run", "the fine-tune"); `budget_field` is the field that raises its budget.
    """
    if not result.trained:
        print(f"{run} in {workdir} is already finished at step {result.step} "
              f"({meta.get('stopped') or result.stop_reason or 'all train.steps done'}); nothing to train"
              f"{': raise ' + budget_field + ' to train on' if result.stop_reason else ''}", file=sys.stderr)
    elif result.stop_reason:
        print(f"{result.stop_reason}: stopped at step {result.step}; {run} is finished", file=sys.stderr)


def _device_batch(host_batch: Callable[[int], dict], shard: Callable, step_number: int,
                  token_share: float = 1.0) -> tuple[int, Any]:
    """(real tokens in the batch, the batch on the mesh) of step `step_number`; `host_batch` builds
    `token_share` of the rows (run_loop)."""
    host = host_batch(step_number)
    n_tokens = real_tokens(host)
    return (n_tokens if token_share == 1.0 else int(round(n_tokens / token_share))), shard(host)


def _progress_bar(total: int, start_step: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start_step, disable=not enabled, unit="step",
                dynamic_ncols=True, file=sys.stderr)
