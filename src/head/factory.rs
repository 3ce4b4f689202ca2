//! The factory: the backend a configuration asks for, its primitives joined with the collectives
//! that reach the job's other shards, under one step driver.

use super::driver::{Driver, StepDriver};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda;
use crate::comm::group::ProcessGroup;
use crate::comm::local::LocalCollectives;
use crate::comm::nccl::NcclCollectives;
use crate::comm::process::ProcessCollectives;
use crate::comm::Collectives;
use crate::config::{BackendKind, Config, DType};
use crate::error::{Error, Result, Status};
use crate::memory::Host;
use half::bf16;
use std::sync::Arc;

/// The backend `cfg` asks for, holding this process's shards of the job. `process_shards` lists
/// every process's local shard count, in process order.
pub(crate) fn create(cfg: &Config, group: &Arc<ProcessGroup>, process_shards: &[usize]) -> Result<Box<dyn StepDriver>> {
    match cfg.backend {
        BackendKind::Cpu => {
            let coll: Box<dyn Collectives<Host>> = if group.is_solo() {
                if cfg.world_size != cfg.local_shards {
                    return Err(Error::new(
                        Status::Unavailable,
                        format!(
                            "the CPU backend reaches other processes only through allgather: world_size {} > local_shards {} needs process_count > 1 and an allgather callback",
                            cfg.world_size, cfg.local_shards
                        ),
                    ));
                }
                Box::new(LocalCollectives::new(cfg.local_shards))
            } else {
                Box::new(ProcessCollectives::new(group.clone(), process_shards.to_vec()))
            };
            let (group, d, first, margin) = (group.clone(), cfg.embedding_dim, cfg.first_rank, cfg.margin.kind);
            Ok(match cfg.storage_dtype {
                DType::BF16 => Box::new(Driver::new(CpuBackend::<bf16>::new(cfg)?, coll, group, d, first, margin)),
                _ => Box::new(Driver::new(CpuBackend::<f32>::new(cfg)?, coll, group, d, first, margin)),
            })
        }
        BackendKind::Cuda => {
            let ordinals: Vec<i32> =
                if cfg.devices.is_empty() { (0..cfg.local_shards as i32).collect() } else { cfg.devices.clone() };
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = ordinals.iter().find(|o| !seen.insert(**o)) {
                return Err(Error::invalid(format!("devices lists GPU {dup} twice: NCCL needs one shard per GPU")));
            }
            let devices = cuda::probe(&ordinals)?;
            let prims = cuda::CudaBackend::new(cfg, &devices)?;
            let coll = NcclCollectives::new(prims.workspaces(), cfg.world_size, cfg.first_rank, group.clone(), process_shards.to_vec(), cfg.nccl_id.as_deref())?;
            Ok(Box::new(Driver::new(prims, Box::new(coll), group.clone(), cfg.embedding_dim, cfg.first_rank, cfg.margin.kind)))
        }
    }
}
