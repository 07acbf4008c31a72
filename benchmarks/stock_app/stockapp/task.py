"""stockapp: model, data and loops, as in Flower's PyTorch quickstart (torchvision-free transforms)."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import load_dataset
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import IidPartitioner
from torch.utils.data import DataLoader


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


fds = None  # Cache FederatedDataset


def to_tensor_normalized(img):
    """ToTensor() + Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) on one PIL image."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def apply_transforms(batch):
    batch["img"] = [to_tensor_normalized(img) for img in batch["img"]]
    return batch


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_path: str):
    global fds
    if fds is None:
        fds = FederatedDataset(
            dataset="parquet",
            data_files={"train": f"{data_path}/train.parquet", "test": f"{data_path}/test.parquet"},
            partitioners={"train": IidPartitioner(num_partitions=num_partitions)},
        )
    partition = fds.load_partition(partition_id).with_transform(apply_transforms)
    return DataLoader(partition, batch_size=batch_size, shuffle=True)


def load_centralized_dataset(data_path: str):
    test_dataset = load_dataset("parquet", data_files={"test": f"{data_path}/test.parquet"}, split="test")
    return DataLoader(test_dataset.with_transform(apply_transforms), batch_size=128)


def train(net, trainloader, epochs, lr, momentum, device):
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
