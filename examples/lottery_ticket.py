"""A lottery ticket by hand, with quatnn's pruning API in a plain PyTorch loop.

Train a quaternion Lenet-300-100 on the bundled digits, prune 90% of its weights by
magnitude in whole quaternions, rewind the survivors to their initial values and retrain
them (the ticket); then train the same mask from a fresh random initialization (the
control). `quatnn lottery` runs this at scale, with run folders, resume and reports.

Run: python examples/lottery_ticket.py
"""

import copy

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from quatnn import data, models, prune

torch.manual_seed(0)
encoding = data.default_encoding("digits", "quaternion", flat=True)  # 196 quaternions
train_set = data.load("digits", train=True, encoding=encoding)
test_set = data.load("digits", train=False, encoding=encoding)
test_x, test_y = next(iter(DataLoader(test_set, batch_size=len(test_set))))


def fit(model: torch.nn.Module, epochs: int = 8) -> float:
    """Train with the lottery-ticket recipe (Adam 1.2e-3, batch 60); the test accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    model.train()
    for _ in range(epochs):
        for x, y in DataLoader(train_set, batch_size=60, shuffle=True):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            prune.enforce(model)  # pruned weights stay exactly zero
    model.eval()
    with torch.no_grad():
        return (model(test_x).argmax(1) == test_y).float().mean().item()


model = models.create("lenet_300_100", "quaternion")
initial = copy.deepcopy(model.state_dict())
dense = fit(model)

spec = prune.PruneSpec(rate=0.9, granularity="quaternion")  # global magnitude, biases kept
masks = prune.prune(model, prune.dense_masks(model), spec)
real_params = models.count_parameters(models.create("lenet_300_100", "real"))
left = prune.sparsity(model, masks, reference_params=real_params)

ticket = models.create("lenet_300_100", "quaternion")
ticket.load_state_dict(initial)  # rewind to initialization
prune.attach(ticket, masks)
ticket_acc = fit(ticket)

torch.manual_seed(1)
control = models.create("lenet_300_100", "quaternion")  # same mask, new initialization
prune.attach(control, masks)
control_acc = fit(control)

print(f"dense quaternion model ({left['params']['total']:,} parameters): {dense:.3f}")
print(
    f"pruned to {left['prunable']['percent_remaining']:.1f}% of its weights "
    f"({left['real_params']['percent_remaining']:.2f}% of the real model's parameters): "
    f"ticket {ticket_acc:.3f}, random re-initialization {control_acc:.3f}"
)
assert ticket_acc > 0.85, "the ticket did not learn"
kept = prune.masks_of(ticket)
assert all((m.weight[~kept[n]] == 0).all() for n, m in prune.prunable_layers(ticket).items())
