"""Cluster pipelines: typed manifests for Argo Workflows, Kubeflow PyTorchJobs and KServe, and their offline checks.

``render`` builds ``pipelines/posttrain.yaml`` and ``pipelines/pretrain.yaml`` from typed objects and
``ClusterSettings``; ``validate`` checks any manifest list the way the API server and the admission webhooks would.
"""
