import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LINGBOT_CLUSTER_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs a Kubernetes cluster; set LINGBOT_CLUSTER_TESTS=1 where one exists")
    for item in items:
        if item.get_closest_marker("cluster") is not None:  # the marker, not keywords (folder names are keywords)
            item.add_marker(skip)
