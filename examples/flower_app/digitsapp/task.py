"""digitsapp: the model, the data and the training loop."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A small MLP for 8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.relu(self.fc1(x)))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def load_data(partition_id: int, num_partitions: int, batch_size: int, seed: int = 0):
    """This node's partition (IID): a train and a validation loader (shuffled by ``seed``)."""
    x, y = _digits()
    x, y = x[:1437], y[:1437]  # the rest is the server's test set
    part = np.array_split(np.arange(len(y)), num_partitions)[partition_id]
    split = int(0.8 * len(part))
    train = TensorDataset(torch.from_numpy(x[part[:split]]), torch.from_numpy(y[part[:split]]))
    val = TensorDataset(torch.from_numpy(x[part[split:]]), torch.from_numpy(y[part[split:]]))
    shuffled = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffled),
        DataLoader(val, batch_size=64),
    )


def load_centralized_dataset() -> DataLoader:
    """The held-out test set."""
    x, y = _digits()
    test = TensorDataset(torch.from_numpy(x[1437:]), torch.from_numpy(y[1437:]))
    return DataLoader(test, batch_size=128)


def train(net: Net, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """Train the model on the training set; the mean training loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss, batches = 0.0, 0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            batches += 1
    return running_loss / max(batches, 1)


def test(net: Net, testloader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy of the model on a data set."""
    net.eval()
    loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images)
            loss += nn.functional.cross_entropy(outputs, labels, reduction="sum").item()
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
    return loss / seen, correct / seen
