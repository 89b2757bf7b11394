"""Stage 3: continual training of the target on the fused distributions.

A plain loop: AdamW, linear warmup then cosine decay, gradient clipping. It
is a function of the config alone, so a resumed run ends with the same bits
as one that never stopped:

- the data order is computed, not drawn: step s takes samples s*B..s*B+B-1
  of the concatenated epochs, each epoch a permutation from a generator
  seeded by (seed, epoch);
- the learning rate is a function of the step (nothing to restore);
- a checkpoint holds the weights, the optimizer's state tensors
  (safetensors) and scalars (JSON), the torch RNG state (dropout draws from
  it) and the step. It is written into a temporary folder and renamed, so a
  kill leaves the previous one intact. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from mergekit_evolver.fusion.loss import fusion_loss
from mergekit_evolver.fusion.shards import AlignedReader

Log = Callable[[str], None]
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"


def derive_seed(seed: int, *keys: str) -> int:
    """A 63-bit torch seed from the run seed and a path of keys."""
    digest = hashlib.sha256("/".join([str(seed), *keys]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextlib.contextmanager
def cpu_env(threads: int) -> Iterator[None]:
    """A fixed intra-op thread count (a CPU reduction's order, and so its
    bits, can depend on it) and denormals flushed (tiny values late in
    training otherwise slow CPU math down many times); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def lr_at(step: int, *, base: float, warmup: int, total: int) -> float:
    """Linear warmup to `base`, then cosine decay towards 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


class Order:
    """Which sequences step s trains on."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch: Optional[int] = None
        self._perm = torch.zeros(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", str(epoch)))
            self._perm, self._epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm

    def batch(self, step: int) -> list[int]:
        return [
            int(self._permutation(g // self.n)[g % self.n])
            for g in range(step * self.batch_size, (step + 1) * self.batch_size)
        ]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [B, L-1] real predictions
    teacher_ids: torch.Tensor  # [B, L-1, S, k]
    teacher_logits: torch.Tensor  # [B, L-1, S, k]
    ce: torch.Tensor  # [B, S]


def collate(seqs: Sequence[dict], pad_id: int) -> Batch:
    """Right-padded tensors; a padding row is a one-hot on id 0, so that its
    softmax is finite before the row mask drops it."""
    b = len(seqs)
    width = max(int(s["input_ids"].shape[0]) for s in seqs)
    n_src, k = seqs[0]["ids"].shape[1], seqs[0]["ids"].shape[2]
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    rows = torch.zeros((b, max(width - 1, 0)), dtype=torch.bool)
    t_ids = torch.full((b, max(width - 1, 0), n_src, k), -1, dtype=torch.long)
    t_logits = torch.full((b, max(width - 1, 0), n_src, k), -math.inf, dtype=torch.float32)
    t_ids[..., 0], t_logits[..., 0] = 0, 0.0
    ce = torch.zeros((b, n_src), dtype=torch.float32)
    for i, s in enumerate(seqs):
        n = int(s["input_ids"].shape[0])
        ids[i, :n], mask[i, :n] = s["input_ids"], 1
        rows[i, : n - 1] = True
        t_ids[i, : n - 1], t_logits[i, : n - 1] = s["ids"], s["logits"]
        ce[i] = s["ce"]
    return Batch(ids, mask, rows, t_ids, t_logits, ce)


# ---------------------------------------------------------------- checkpoints


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as safetensors tensors and JSON scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted(p for p in Path(folder).glob(CHECKPOINT_PREFIX + "*") if (p / STATE_FILE).is_file())
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, model, optimizer, history: list, device: str) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1))
    rng = {"torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    # Written last: a folder with state.json is whole.
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "history": history}))
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in folder.glob(CHECKPOINT_PREFIX + "*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, device: str) -> tuple[int, list]:
    load_model(model, str(path / "model.safetensors"), device=device)
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_state(load_file(str(path / "optimizer.safetensors")), meta))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((path / STATE_FILE).read_text())
    return int(state["step"]), list(state["history"])


def clear_debris(folder: Path) -> None:
    for tmp in Path(folder).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- the loop


@dataclass
class Trained:
    model: torch.nn.Module
    history: list = field(default_factory=list)  # per step: [loss, clm, fusion]
    resumed_from: int = 0


def train_target(config, model: torch.nn.Module, reader: AlignedReader, checkpoints: Path, pad_id: int, log: Log) -> Trained:
    """Train `model` (the loaded target) for config.steps steps, resuming
    from the latest checkpoint in `checkpoints` when there is one."""
    device = config.device
    clear_debris(checkpoints)
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(derive_seed(config.seed, "train"))
        model.to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        start, history = 0, []
        found = latest_checkpoint(checkpoints)
        if found is not None:
            start, history = load_checkpoint(found, model, optimizer, device)
            log(f"fuse: resuming training at step {start} from {found.name}")
        order = Order(len(reader), config.batch_size, config.seed)
        every = max(1, config.steps // 10)
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, base=config.learning_rate, warmup=config.warmup_steps, total=config.steps)
            batch = collate([reader.sequence(i) for i in order.batch(step)], pad_id)
            out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
            parts = fusion_loss(
                out.logits, batch.input_ids.to(device), batch.rows.to(device),
                batch.teacher_ids.to(device), batch.teacher_logits.to(device), batch.ce.to(device),
                method=config.fusion, lam=config.lambda_, temperature=config.temperature,
            )
            optimizer.zero_grad(set_to_none=True)
            parts.loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            history.append([parts.loss.item(), parts.clm.item(), parts.fusion.item()])
            done = step + 1
            if done % every == 0 or done == config.steps:
                loss, clm, fus = history[-1]
                log(f"fuse: step {done}/{config.steps} loss {loss:.4f} (clm {clm:.4f}, fusion {fus:.4f})")
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_checkpoint(checkpoints, done, model, optimizer, history, device)
        model.eval()
        return Trained(model, history, start)
