"""fedcifar: the PyTorch CIFAR-10 tutorial CNN, federated with Flower, on Kubernetes, observed."""

__version__ = "0.1.0"
