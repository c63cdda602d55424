"""Cluster pipelines: typed manifests for Argo Workflows, Kubeflow PyTorchJobs and KServe, and their offline checks.

``render`` builds ``pipelines/posttrain.yaml``, ``pipelines/pretrain.yaml`` and the kustomize base's
``infra/kustomize/base/policy.yaml`` from typed objects (``manifests``, ``workflows``) and ``ClusterSettings``;
``validate`` checks any manifest list the way the API server and the admission webhooks would.
"""
