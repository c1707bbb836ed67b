"""A Flower client, written as Flower's quickstart examples write one, run by hfl-mqtt.

Nothing here knows about hfl-mqtt but the data loading: ``FlowerClient`` is a plain
``flwr.client.NumPyClient`` around a small PyTorch MLP (64-128-10, 9,610 parameters) on
scikit-learn's 8x8 digits (bundled with scikit-learn: no download). ``client_fn`` builds the
client of one partition (a Dirichlet label split, alpha 1.0, of the training set);
``evaluate_fn`` is a Flower strategy's centralized evaluation on the held-out test set.

    hfl-mqtt sim examples/flower_clients/federation.yaml --out out/flower
"""

from collections import OrderedDict

import torch
from flwr.client import NumPyClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hfl_mqtt.tasks import PartitionConfig, load_digits_split, partition_indices

BATCH_SIZE = 16
PARTITIONING = PartitionConfig(scheme="dirichlet", alpha=1.0, seed=0)


class Net(nn.Module):
    """A multilayer perceptron for 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def get_weights(net):
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net, parameters):
    params_dict = zip(net.state_dict().keys(), parameters, strict=True)
    state_dict = OrderedDict({k: torch.tensor(v) for k, v in params_dict})
    net.load_state_dict(state_dict, strict=True)


def train(net, trainloader, epochs, lr):
    """Train the model on the training set."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader):
    """Validate the model on the test set."""
    criterion = torch.nn.CrossEntropyLoss()
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images)
            loss += criterion(outputs, labels).item() * len(labels)
            correct += (outputs.argmax(dim=1) == labels).sum().item()
    return loss / len(testloader.dataset), correct / len(testloader.dataset)


digits = None  # Cache the data set: many clients run in one process


def load_digits():
    global digits  # noqa: PLW0603 (Flower's examples cache their FederatedDataset so)
    if digits is None:
        digits = load_digits_split(test_fraction=0.2, seed=0)
    return digits


def load_data(partition_id, num_partitions):
    """Load partition ``partition_id`` of the digits training set: 80% train, 20% validation."""
    data = load_digits()
    parts = partition_indices(data.y_train, num_partitions, PARTITIONING)
    idx = parts[partition_id]
    split = max(1, int(0.8 * len(idx)))
    x, y = torch.tensor(data.x_train[idx]), torch.tensor(data.y_train[idx])
    trainloader = DataLoader(
        TensorDataset(x[:split], y[:split]), batch_size=BATCH_SIZE, shuffle=True
    )
    valloader = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=BATCH_SIZE)
    return trainloader, valloader


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader):
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader

    def get_parameters(self, config):
        return get_weights(self.net)

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        train_loss = train(self.net, self.trainloader, config["local_epochs"], config["lr"])
        return get_weights(self.net), len(self.trainloader.dataset), {"train_loss": train_loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader)
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(partition_id, num_partitions):
    """Create the Flower client of one partition."""
    net = Net()
    trainloader, valloader = load_data(partition_id, num_partitions)
    return FlowerClient(net, trainloader, valloader)


def evaluate_fn(server_round, parameters_ndarrays, config):
    """Evaluate the global model on the held-out test set (a strategy's ``evaluate_fn``)."""
    net = Net()
    set_weights(net, parameters_ndarrays)
    data = load_digits()
    testloader = DataLoader(
        TensorDataset(torch.tensor(data.x_test), torch.tensor(data.y_test)), batch_size=256
    )
    loss, accuracy = test(net, testloader)
    return loss, {"accuracy": accuracy}
