//! Shapes the autoscaler's unit tests share: an A100 node (24 CPU, 220 GiB,
//! one GPU) and a one-GPU pod (4 CPU, 16 GiB). Test-only.
use super::resources::Resources;

/// Allocatable of a one-GPU node.
pub fn gpu_node() -> Resources {
    Resources {
        cpu: 24_000,
        memory: 220 << 30,
        gpu: 1,
        pods: 110,
        ..Default::default()
    }
}

/// Request of a one-GPU pod.
pub fn gpu_pod() -> Resources {
    Resources {
        cpu: 4_000,
        memory: 16 << 30,
        gpu: 1,
        pods: 1,
        ..Default::default()
    }
}
