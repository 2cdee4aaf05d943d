"""Build a network mixing quaternion and torch layers, train it briefly, check it learned.

Run: python examples/quickstart.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from quatnn.nn import QConv2d, QLinear, QMaxPool2d

torch.manual_seed(0)
model = nn.Sequential(
    QConv2d(4, 16, 3, padding=1),
    nn.ReLU(),
    QMaxPool2d(2),  # 4 real channels = 1 quaternion
    QConv2d(16, 32, 3, padding=1),
    nn.ReLU(),
    QMaxPool2d(2),
    nn.Flatten(),
    QLinear(32 * 4 * 4, 64),
    nn.ReLU(),
    nn.Linear(64, 2),  # real head: class counts need not be divisible by 4
)
real = nn.Sequential(
    nn.Conv2d(4, 16, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(32 * 4 * 4, 64),
    nn.ReLU(),
    nn.Linear(64, 2),
)
print(model)
params = sum(p.numel() for p in model.parameters())
real_params = sum(p.numel() for p in real.parameters())
print(f"parameters: quaternion {params:,} vs real {real_params:,} ({params / real_params:.2f}x)")

# task: is the bright blob in the left or the right half of a noisy 4-channel image?
x = torch.randn(512, 4, 16, 16) * 0.5
labels = torch.randint(0, 2, (512,))
for n, side in enumerate(labels):
    col = 2 + 8 * int(side) + torch.randint(0, 4, ()).item()
    x[n, :, 6:10, col : col + 3] += 2.0
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(40):
    batch = torch.randint(0, 384, (64,))
    loss = F.cross_entropy(model(x[batch]), labels[batch])
    opt.zero_grad()
    loss.backward()
    opt.step()
with torch.no_grad():
    acc = (model(x[384:]).argmax(1) == labels[384:]).float().mean().item()
print(f"held-out accuracy after 40 steps: {acc:.3f}")
assert acc > 0.9, "the quaternion network did not learn the task"
