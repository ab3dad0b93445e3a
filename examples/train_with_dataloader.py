"""Train a P-MLP on MNIST from Python with a plain torch DataLoader and integer labels.

    python examples/train_with_dataloader.py            # the shipped mnist-demo subset, 3 epochs
    python examples/train_with_dataloader.py --quick    # a few batches (what CI runs)
"""
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from eqprop import PMLP, Phases, build_estimator
from eqprop.data import load_dataset
from eqprop.training.loop import evaluate, train_epoch

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
size, epochs = (300, 1) if args.quick else (3000, 3)

train, test = load_dataset("mnist-demo", "train"), load_dataset("mnist-demo", "test")
train_loader = DataLoader(TensorDataset(train.x[:size], train.y[:size]), batch_size=50, shuffle=True)
test_loader = DataLoader(TensorDataset(test.x, test.y), batch_size=500)

model = PMLP([784, 256, 10], activation="scaled_sigmoid", loss="mse")        # x is flattened by the model
estimator = build_estimator("symmetric", Phases(t1=30, t2=10, beta=0.2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)                       # one rate for every layer
for epoch in range(1, epochs + 1):
    stats = train_epoch(model, estimator, optimizer, train_loader, epoch)
    test_loss, test_error, _ = evaluate(model, test_loader, t1=30)
    print(f"epoch {epoch}: train error {100 * stats.error:.1f}%  test error {100 * test_error:.1f}%")
