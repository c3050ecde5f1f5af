"""Deployment: the local stack, Prefect deployments and KubeRay manifests, from one config.

See ``infra/README.md`` for the way from a laptop to a cluster, and
:mod:`infra.config` for the config every part reads.
"""
