"""What the every-step tests share: a Trainer over the tiny models, the parameters θ_s each optimizer step used,
and the independent references at those parameters (the batch-size-1 loop engine; a hand-written training loop
for the update without dropped examples)."""

from __future__ import annotations

import copy
import gc
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from sqsd_callback import score_samples
from sqsd_callback.layers import lora_targets
from sqsd_callback.runtime.distributed import full_parameters
from sqsd_callback.sinks import read_jsonl
from sqsd_lab.tiny import pad_collator, score_err

SCORE_KEYS = ["danger", "safety", "sqsd", "danger/d1", "danger/d2", "safety/s1"]


def trainer(model, samples, out, callbacks=(), batch=2, accum=1, steps=3, optim=None, lr=0.05, collator=None,
            optimizers=(None, None), processing_class=None, **kw) -> Trainer:
    """The tests' one Trainer: on CPU over ``samples`` (right-padded unless ``collator``), logging every step, no
    reporting or checkpoints, clipping at 0.05, seed 5; ``optim=None`` keeps TrainingArguments' default optimizer
    (fused AdamW) and its linear schedule. Any TrainingArguments field in ``kw`` overrides these."""
    defaults = dict(logging_steps=1, report_to=[], save_strategy="no", max_grad_norm=0.05, seed=5, disable_tqdm=True)
    if optim is not None:
        kw["optim"] = optim
    if kw.get("gradient_checkpointing"):  # reentrant checkpointing of frozen embeddings needs inputs that require
        model.enable_input_require_grads()  # grad: transformers ≥ 5 sets this up itself, 4.x leaves it to the user
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=lr, use_cpu=True, **{**defaults, **kw})
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(samples),
                   data_collator=collator or pad_collator(), callbacks=list(callbacks), optimizers=optimizers,
                   processing_class=processing_class)


def trainable(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def unchanged(model, start: dict[str, torch.Tensor]) -> bool:
    """Whether the trainable parameters still equal ``start`` (``trainable(model)`` before a refused run)."""
    return all(torch.equal(p, start[n]) for n, p in trainable(model).items())


class CrashAtStep3(TrainerCallback):
    """Raises after optimizer step 3, as a killed or failing run would (checkpoints at step 2 survive it)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("simulated crash")


class CrashAt(TrainerCallback):
    """Raises at the end of optimizer step ``step``, after the callbacks before it in the Trainer's list have seen
    that step and before its checkpoint is written, as a killed run would (the last checkpoint is ``step`` − 1)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


class ThetaEachStep(TrainerCallback):
    """Records θ_s, the trainable parameters optimizer step s starts from (θ_0 at train begin, θ_s after step s),
    whole where FSDP2 or ZeRO-3 shard them."""

    def __init__(self) -> None:
        self.theta: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)

    def _record(self, state, model) -> None:
        with full_parameters(model, [p for p in model.parameters() if p.requires_grad]):
            self.theta[state.global_step] = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                                             if p.requires_grad}


def launch(worker: Path, out: Path, nproc: int = 2, **env) -> None:
    """Run ``worker OUT`` in ``nproc`` CPU processes under torchrun (gloo), tests/ on its import path."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)]),
           **env}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                           str(port), str(worker), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def finish_worker() -> None:
    """End a torchrun worker whose work is done: every rank reaches a barrier, the process group is destroyed and
    the process leaves without interpreter teardown, where gloo's and DeepSpeed's C++ threads could abort a finished
    rank ("terminate called without an active exception", once in CI on the ZeRO worker after its last stage)."""
    gc.collect()  # engines and wrapped models go while the process group still exists
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def at(model, theta: dict[str, torch.Tensor]):
    """A copy of ``model`` with its trainable parameters set to ``theta``."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in probe.named_parameters():
            if n in theta:
                p.copy_(theta[n])
    return probe


def assert_every_step_matches_loop(model, samples, out, thetas: ThetaEachStep, danger, safety, metric="cosine",
                                   steps=3, tol=1e-5, keys=SCORE_KEYS) -> dict[int, float]:
    """Every row of ``<out>/sqsd/scores.jsonl`` equals the batch-size-1 loop at the parameters its step used:
    per step and key, max |row − loop| ≤ tol × the key's scale over the step's loop rows (``score_scale``: max |loop|
    for a set's score, the mean of its sets' scales for danger and safety, danger's plus safety's for sqsd = danger −
    safety, whose own max |·| cancellation can make small). Returns the worst relative error per step."""
    rows = read_jsonl(out / "sqsd" / "scores.jsonl")
    assert sorted({r["step"] for r in rows}) == list(range(steps)), "a step has no rows"
    worst = {}
    for s in range(steps):
        got = [r for r in rows if r["step"] == s]
        want = score_samples(at(model, thetas.theta[s]), [dict(samples[r["index"]], index=r["index"]) for r in got],
                             danger, safety, metric=metric, engine="loop", progress=False)
        errs = {k: score_err(got, want, k) for k in keys}
        worst[s] = max(errs.values())
        assert worst[s] <= tol, f"step {s}: {errs}"
    print(f"agreement {os.environ.get('PYTEST_CURRENT_TEST', '')}: {max(worst.values()):.2e}")  # for the README
    return worst


def dense_drift_cosines(delta: dict[str, torch.Tensor], sets) -> dict[str, float]:
    """cos(θ_t − θ_0, V) of each set over the modules it covers, from each module's out×in change ``delta[m]``
    formed densely; keyed as drift.jsonl's ``cosine/<kind>/<name>``."""
    out = {}
    for s in sets:
        num = sum(float((delta[m] * v.materialize()).sum()) for m, v in s.modules.items())
        wn = sum(float(delta[m].pow(2).sum()) for m in s.modules) ** 0.5
        vn = sum(float(v.materialize().pow(2).sum()) for v in s.modules.values()) ** 0.5
        out[f"cosine/{s.kind}/{s.name}"] = num / (wn * vn)
    return out


def trained_weights(model) -> dict[str, torch.Tensor]:
    """Each scored module's trained weight as out×in, formed densely: s·B A for LoRA, W itself in full
    fine-tuning."""
    from sqsd_callback.layers import LoraTarget, find_targets
    return {m: (t.scaling * t.B @ t.A if isinstance(t, LoraTarget) else t.weight_oi).detach().clone()
            for m, t in find_targets(model).items()}


def assert_final_drift_is_dense(out: Path, delta: dict[str, torch.Tensor], sets, rel: float = 1e-4) -> None:
    """The last drift.jsonl row's cosine with each set equals ``dense_drift_cosines(delta)`` (rel tolerance)."""
    drift = read_jsonl(out / "sqsd" / "drift.jsonl")[-1]
    for key, want in dense_drift_cosines(delta, sets).items():
        assert abs(drift[key] - want) <= rel * abs(want), (key, drift[key], want)


def dense_asft(model, dirs: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """AsFT's penalty λ Σ_m ‖(I − Ĉ_m) ΔW_m‖², Ĉ = V Vᵀ/‖V‖_F, ΔW = s·B A, formed densely (differentiable)."""
    total = 0.0
    for m, t in lora_targets(model).items():
        if m in dirs:
            dW, V = t.scaling * t.B @ t.A, dirs[m]
            total = total + (dW - V @ V.T @ dW / V.norm()).pow(2).sum()
    return lam * total


def assert_steps_equal_kept_only(model, samples, rows, out, thetas: ThetaEachStep, steps=3, max_grad_norm=0.05,
                                 lr=0.05, penalty=None, **kw) -> None:
    """θ after every step of the run whose rows are ``rows`` equals a hand-written loop's from the same start
    (``model``, trained here) with the Trainer's own optimizer and scheduler on each step's kept examples alone:
    loss = Σ token CE / kept scored tokens (+ ``penalty(model)``), clipped, one optimizer step. Tolerance 1e-3 × lr:
    AdamW moves each weight by about lr, and where |g| is near its eps it magnifies the fp32 rounding of the
    gradient (summed in another order)."""
    ref = trainer(model, samples, out, max_grad_norm=max_grad_norm, lr=lr, steps=steps, **kw)
    ref.create_optimizer_and_scheduler(num_training_steps=steps)
    collate, params = pad_collator(), [p for p in model.parameters() if p.requires_grad]
    model.train()
    for s in range(steps):
        batch = collate([samples[r["index"]] for r in rows if r["step"] == s and not r["dropped"]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
        loss = loss / (labels != -100).sum()
        (loss if penalty is None else loss + penalty(model)).backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        ref.optimizer.step()
        ref.lr_scheduler.step()
        ref.optimizer.zero_grad()
        got, want = thetas.theta[s + 1], trainable(model)
        moved = max((want[n] - thetas.theta[s][n]).abs().max().item() for n in got)
        err = max((got[n] - want[n]).abs().max().item() for n in got)
        assert err < 1e-3 * lr < moved, f"step {s}: |θ − reference| = {err:.3g}, the step moved θ by {moved:.3g}"
