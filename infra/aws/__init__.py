"""AWS components of the cluster (network, storage, identity, compute) and its cloud-init bootstrap."""
