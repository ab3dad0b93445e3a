"""Train the authors' own C-VF network (ernoult/continualEP, ``VFdisc``) on eqprop's MNIST files.

Issue 13 asks whether the published code shows the C-VF-1h collapse that eqprop's
``cvf-1h`` run shows at the same settings. This script imports the authors'
``netClasses.VFdisc`` and ``netFunctions.train``/``evaluate`` from a checkout of their
repository (not part of eqprop: pass its path) and runs them unchanged with the
README's C-VF-1h command (``--discrete --size_tab 10 512 784 --lr_tab 0.0038 0.0076
--epochs 100 --T 40 --Kmax 15 --beta 0.20 --cep --learning-rule vf --randbeta 0.5``),
on the CPU. Only the data path differs: their ``main.py`` downloads MNIST through
torchvision, here the same images (scaled to [0, 1], flattened, one-hot targets,
shuffled batches of 20, test batches of 1000) come from eqprop's verified files, and
``torchvision`` (imported but unused by those two modules) is stubbed.

Every epoch appends one JSON line to ``OUT/metrics.jsonl``: epoch, training and test
error (fractions, as eqprop writes them), seconds, and the parameter norms named as in
eqprop's VF-MLP (``norm/layers.0.weight`` is their ``w[2]``, ``norm/backward.layers.1``
their ``w[1]``) and the W2-B2^T angle (``angle/layer2``), so the curves line up with
eqprop's records; and it writes ``OUT/checkpoint.pt`` (weights, epoch, torch and numpy random states; atomically),
from which ``--resume`` goes on (``--epochs`` is the total): the run takes about 100 s
per epoch on one core, so it is carried across sessions in pieces. Their code seeds torch only; numpy (the sign of β) is
seeded here too, so a run and its resumed pieces repeat.

    git clone https://github.com/ernoult/continualEP /tmp/continualEP
    python benchmarks/authors_cvf.py --authors-repo /tmp/continualEP --data-dir ../shared/data \\
        --out benchmarks/results/authors_cvf/seed-0 --epochs 100 --seed 0
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from eqprop.data.mnist import load_mnist

#: the README's C-VF-1h command, as the namespace their classes read
CVF_1H = dict(T=40, Kmax=15, size_tab=[10, 512, 784], lr_tab=[0.0038, 0.0076], beta=0.2, randbeta=0.5,
              cep=True, angle=0.0, device_label=-1, discrete=True, learning_rule="vf", former=False)


def import_authors_code(repo: Path) -> tuple[type, types.ModuleType]:
    """``VFdisc`` and the ``netFunctions`` module from ``repo``, with their ``main``'s sigmoid."""
    if not (repo / "netClasses.py").is_file():
        raise SystemExit(f"{repo} is not a checkout of ernoult/continualEP (no netClasses.py)")

    def rho(x: torch.Tensor) -> torch.Tensor:   # their main.py, --activation-function sigm (the default)
        return 1 / (1 + torch.exp(-(4 * (x - 0.5))))

    def rhop(x: torch.Tensor) -> torch.Tensor:
        return 4 * rho(x) * (1 - rho(x))

    main = types.ModuleType("main")
    main.rho, main.rhop = rho, rhop
    sys.modules["main"] = main
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    sys.path.insert(0, str(repo))
    import netClasses
    import netFunctions
    return netClasses.VFdisc, netFunctions


def loader(root: Path, split: str, batch_size: int, shuffle: bool,
           samples: int | None = None) -> torch.utils.data.DataLoader:
    data = load_mnist(root, split)
    x = data.x[:samples].flatten(1).float() / 255.0
    y = torch.nn.functional.one_hot(data.y[:samples], 10).float()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                       shuffle=shuffle)


def norms(net: torch.nn.Module) -> dict[str, float]:
    """Parameter norms under eqprop's VF-MLP names (their ``w`` list is output layer first),
    and the W2-B2^T angle in degrees, as eqprop's ``angle/layer2``."""
    w = net.w
    named = {"layers.0.weight": w[2].weight, "layers.0.bias": w[2].bias, "layers.1.weight": w[0].weight,
             "layers.1.bias": w[0].bias, "backward.layers.1": w[1].weight}
    W2, B2 = w[0].weight.detach(), w[1].weight.detach()
    cosine = float((W2 * B2.t()).sum() / (W2.norm() * B2.norm()))
    return {**{f"norm/{name}": float(p.detach().norm()) for name, p in named.items()},
            "angle/layer2": math.degrees(math.acos(max(-1.0, min(1.0, cosine))))}


def save_checkpoint(path: Path, net: torch.nn.Module, epoch: int) -> None:
    """Weights and random states after ``epoch``, written atomically (a temporary file renamed)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    payload = {"epoch": epoch, "net": net.state_dict(), "torch_rng": torch.get_rng_state(),
               "numpy_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                             "has_gauss": has_gauss, "gauss": gauss}}
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, net: torch.nn.Module) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the epoch it ended."""
    payload = torch.load(path, weights_only=True)
    net.load_state_dict(payload["net"])
    torch.set_rng_state(payload["torch_rng"])
    state = payload["numpy_rng"]
    np.random.set_state(("MT19937", state["keys"].numpy().astype(np.uint32), state["position"],
                         state["has_gauss"], state["gauss"]))
    return int(payload["epoch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authors-repo", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="go on from OUT/checkpoint.pt")
    parser.add_argument("--samples", type=int, default=None, help="first N images of each split (a quick check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    VFdisc, functions = import_authors_code(args.authors_repo.resolve())
    net = VFdisc(argparse.Namespace(**CVF_1H))
    train = loader(args.data_dir, "train", 20, True, args.samples)
    test = loader(args.data_dir, "test", 1000, False, args.samples)
    checkpoint, metrics = args.out / "checkpoint.pt", args.out / "metrics.jsonl"
    done = 0
    if args.resume:
        done = load_checkpoint(checkpoint, net)
        kept = metrics.read_text().splitlines()[:done]   # drop lines of an epoch cut off before its checkpoint
        metrics.write_text("".join(line + "\n" for line in kept))
    elif metrics.exists():
        raise SystemExit(f"{args.out} already holds a run: pass --resume to go on with it")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "commands.txt", "a") as commands:
        commands.write(" ".join(["python"] + sys.argv) + "\n")
    with open(metrics, "a") as log:
        for epoch in range(done + 1, args.epochs + 1):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):   # their per-100-batch progress lines
                train_error = functions.train(net, train, epoch, "vf")
                test_error = functions.evaluate(net, test)
            record = {"epoch": epoch, "train_error": round(train_error / 100, 6),
                      "test_error": round(test_error / 100, 6), "seconds": time.perf_counter() - start,
                      **norms(net)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            save_checkpoint(checkpoint, net, epoch)
            print(f"epoch {epoch}: train {train_error:.2f}% test {test_error:.2f}%", flush=True)


if __name__ == "__main__":
    main()
