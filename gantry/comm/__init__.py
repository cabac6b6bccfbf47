"""Communication between processes: typed messages and their codec, the Redis control plane
(streams, heartbeats), and weight transfer over torch.distributed (tensors never go through Redis)."""
